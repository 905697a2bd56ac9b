"""Weight formats and backends, applied to a built model from outside; `dsv2.model` keeps plain modules.

- `onednn`: fp32 projections and experts through oneDNN (training products; packed weights for inference).
- `quant`: weight-only int8 and int4 formats for projections and stacked experts, each with a dequantize +
  F.linear reference beside its fast path.
"""
