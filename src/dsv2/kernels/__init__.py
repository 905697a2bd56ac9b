"""Weight formats and backends, applied to a built model from outside; `dsv2.model` keeps plain modules.

- `onednn`: fp32 projections and experts through oneDNN (training products; packed weights for inference).
- `quant`: weight-only int8 and int4 formats for projections and stacked experts, each with a dequantize +
  F.linear reference beside its fast path.
- `native`: dsv2's own few-row int8 / int4 CPU kernels (cpu/gemv.cpp), built at first use; `quant` runs on them
  when they build and on torch's kernels otherwise.
- `prepare`: inference-only forms of dense weights the CPU decode reads (absorbed attention blocks, fp32 router).
"""
