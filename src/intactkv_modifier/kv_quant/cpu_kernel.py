"""A compiled C++ loop over the quantized tokens of a CPU decode step: codes widened one token at a time.

With torch operations (:mod:`~intactkv_modifier.kv_quant.cpu_decode`'s fallback) a decode step widens the whole
quantized past to floats before each matrix product: unpacking, converting, scaling and offsetting are each a
pass over ``tokens x head_dim`` floats, several times the bytes a full-precision cache reads. Here each token's
codes are widened into a row of ``head_dim`` floats that stays in L1 and is used at once by every query of its
KV head, so a step reads the packed bytes and little else. Measured on the session machine (AMD EPYC, one
thread, torch 2.13, float32, 2 KV heads of 64 channels, GQA group of 4, 4K quantized tokens): keys scored in
0.24 ms against 0.37 ms widened and multiplied by torch ops, values summed in 0.30 ms against 0.37 ms (sdpa
over the full-precision cache: 0.45 ms); at 1K, 0.065 and 0.072 ms against 0.12 and 0.12 ms.

The loop computes what :func:`~intactkv_modifier.kv_quant.quantizer.dequantize` computes for each element
(``code * scale``, then ``+ minimum``, two float32 roundings: built with ``-ffp-contract=off``) and sums the
products in another order: the result is the torch path's within float32 reordering. It covers one-byte
packing units (2, 4 and 8 bits), both groupings, float32 and the common head dims (:func:`kernel_ready`);
anything else takes the torch path. It is built by ``torch.utils.cpp_extension`` on first use (about 30 s,
then cached in ``TORCH_EXTENSIONS_DIR``); without a compiler, or with ``INTACTKV_CPU_KERNEL=0``, the torch
path runs.
"""

from __future__ import annotations

import functools
import os

import torch
from loguru import logger

from intactkv_modifier.kv_quant.quantizer import QuantizedTensor

__all__ = ["built", "key_scores", "kernel_ready", "value_sums"]

_BITS = (2, 4, 8)
#: head dims the loop is instantiated for (a compile-time length lets the compiler unroll it)
_DIMS = (32, 64, 128, 256)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// A token's codes are widened plane by plane: position i * bytes + b holds code i of byte b, channel
// b * PER + i. Each plane is one loop over contiguous bytes (vectorized: widen, shift, mask, convert);
// queries are permuted into that order once per head, and value sums permuted back once per head.
struct Rows {
  const uint8_t* codes; int64_t codes_head, codes_row;
  const float* scale; const float* minimum; int64_t stats_head, stats_row;
  int64_t group; bool per_channel;

  // the token's values in plane order, each dequantize()'s element: code * scale, then + minimum
  template <int BITS, int DIM>
  inline void widen(int64_t head, int64_t t, const float* __restrict planar_scale,
                    const float* __restrict planar_minimum, float* __restrict x) const {
    constexpr int PER = 8 / BITS;
    constexpr int MASK = (1 << BITS) - 1;
    constexpr int64_t bytes = DIM / PER, dim = DIM;
    const uint8_t* row = codes + head * codes_head + t * codes_row;
    for (int i = 0; i < PER; ++i) {
      float* plane = x + i * bytes;
      for (int64_t b = 0; b < bytes; ++b) plane[b] = static_cast<float>((row[b] >> (BITS * i)) & MASK);
    }
    if (per_channel) {  // this block's statistics, permuted by the caller
      for (int64_t d = 0; d < dim; ++d) x[d] = x[d] * planar_scale[d];
      for (int64_t d = 0; d < dim; ++d) x[d] = x[d] + planar_minimum[d];
      return;
    }
    // per token: a group of `group` channels is group / PER consecutive bytes, in every plane
    const float* s = scale + head * stats_head + t * stats_row;
    const float* z = minimum + head * stats_head + t * stats_row;
    const int64_t span = group / PER;
    for (int i = 0; i < PER; ++i) {
      for (int64_t j = 0; j < dim / group; ++j) {
        float* xj = x + i * bytes + j * span;
        const float sj = s[j], zj = z[j];
        for (int64_t d = 0; d < span; ++d) xj[d] = xj[d] * sj;
        for (int64_t d = 0; d < span; ++d) xj[d] = xj[d] + zj;
      }
    }
  }

  // a per-channel block's statistics in plane order (unused per token)
  template <int BITS, int DIM>
  inline void block(int64_t head, int64_t t, float* planar_scale, float* planar_minimum) const {
    if (!per_channel) return;
    const float* s = scale + head * stats_head + (t / group) * stats_row;
    const float* z = minimum + head * stats_head + (t / group) * stats_row;
    to_planes<BITS, DIM>(s, planar_scale);
    to_planes<BITS, DIM>(z, planar_minimum);
  }

  template <int BITS, int DIM>
  inline void to_planes(const float* channels, float* planar) const {
    constexpr int PER = 8 / BITS;
    constexpr int64_t bytes = DIM / PER;
    for (int i = 0; i < PER; ++i)
      for (int64_t b = 0; b < bytes; ++b) planar[i * bytes + b] = channels[b * PER + i];
  }

  template <int BITS, int DIM>
  inline void from_planes(const float* planar, float* channels) const {
    constexpr int PER = 8 / BITS;
    constexpr int64_t bytes = DIM / PER;
    for (int i = 0; i < PER; ++i)
      for (int64_t b = 0; b < bytes; ++b) channels[b * PER + i] = planar[i * bytes + b];
  }
};

Rows rows_of(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum, int64_t group,
             bool per_channel) {
  // [batch * heads] flattened by the caller; rows (axis 1) of codes and statistics are contiguous, and the
  // minimums strided as the scales
  return Rows{codes.data_ptr<uint8_t>(), codes.stride(0), codes.stride(1), scale.data_ptr<float>(),
              minimum.data_ptr<float>(), scale.stride(0), scale.stride(1), group, per_channel};
}

template <int BITS, int DIM>
void scores_loop(const at::Tensor& query, const Rows& rows, int64_t tokens, at::Tensor& out) {
  const int64_t heads = query.size(0), queries = query.size(1);
  constexpr int64_t dim = DIM;
  const float* q = query.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(dim), planar_query(queries * dim), planar_scale(dim), planar_minimum(dim);
    for (int64_t head = begin; head < end; ++head) {
      for (int64_t m = 0; m < queries; ++m)
        rows.template to_planes<BITS, DIM>(q + (head * queries + m) * dim, planar_query.data() + m * dim);
      for (int64_t t = 0; t < tokens; ++t) {
        if (t % rows.group == 0) rows.template block<BITS, DIM>(head, t, planar_scale.data(), planar_minimum.data());
        rows.template widen<BITS, DIM>(head, t, planar_scale.data(), planar_minimum.data(), x.data());
        for (int64_t m = 0; m < queries; ++m) {
          const float* qm = planar_query.data() + m * dim;
          const float* xt = x.data();
          float sum = 0.f;
          #pragma omp simd reduction(+ : sum)
          for (int64_t d = 0; d < dim; ++d) sum += qm[d] * xt[d];
          o[(head * queries + m) * tokens + t] = sum;
        }
      }
    }
  });
}

template <int BITS, int DIM>
void sums_loop(const at::Tensor& probs, const Rows& rows, at::Tensor& out) {
  const int64_t heads = probs.size(0), queries = probs.size(1), tokens = probs.size(2);
  constexpr int64_t dim = DIM;
  const float* p = probs.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(dim), acc(queries * dim), planar_scale(dim), planar_minimum(dim);
    for (int64_t head = begin; head < end; ++head) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < tokens; ++t) {
        if (t % rows.group == 0) rows.template block<BITS, DIM>(head, t, planar_scale.data(), planar_minimum.data());
        rows.template widen<BITS, DIM>(head, t, planar_scale.data(), planar_minimum.data(), x.data());
        const float* xt = x.data();
        for (int64_t m = 0; m < queries; ++m) {
          const float weight = p[(head * queries + m) * tokens + t];
          float* am = acc.data() + m * dim;
          #pragma omp simd
          for (int64_t d = 0; d < dim; ++d) am[d] += weight * xt[d];
        }
      }
      for (int64_t m = 0; m < queries; ++m)
        rows.template from_planes<BITS, DIM>(acc.data() + m * dim, o + (head * queries + m) * dim);
    }
  });
}

// the loop instantiated for these bits and head_dim (kernel_ready() admits only these)
template <int BITS, typename Loop>
void dispatch_dim(int64_t dim, Loop&& loop) {
  using B = std::integral_constant<int, BITS>;
  if (dim == 32) loop(B{}, std::integral_constant<int, 32>{});
  else if (dim == 64) loop(B{}, std::integral_constant<int, 64>{});
  else if (dim == 128) loop(B{}, std::integral_constant<int, 128>{});
  else if (dim == 256) loop(B{}, std::integral_constant<int, 256>{});
  else TORCH_CHECK(false, "head_dim ", dim, " is not compiled in");
}

template <typename Loop>
void dispatch(int64_t bits, int64_t dim, Loop&& loop) {
  if (bits == 2) dispatch_dim<2>(dim, loop);
  else if (bits == 4) dispatch_dim<4>(dim, loop);
  else dispatch_dim<8>(dim, loop);
}

}  // namespace

// query [heads, queries, dim], codes [heads, tokens, bytes]: scores [heads, queries, tokens]
at::Tensor key_scores(const at::Tensor& query, const at::Tensor& codes, const at::Tensor& scale,
                      const at::Tensor& minimum, int64_t bits, int64_t group, bool per_channel) {
  const int64_t tokens = codes.size(1);
  at::Tensor out = at::empty({query.size(0), query.size(1), tokens}, query.options());
  const Rows rows = rows_of(codes, scale, minimum, group, per_channel);
  dispatch(bits, query.size(2), [&](auto bits_, auto dim_) {
    scores_loop<decltype(bits_)::value, decltype(dim_)::value>(query, rows, tokens, out);
  });
  return out;
}

// probs [heads, queries, tokens], codes [heads, tokens, bytes]: sums [heads, queries, dim]
at::Tensor value_sums(const at::Tensor& probs, const at::Tensor& codes, const at::Tensor& scale,
                      const at::Tensor& minimum, int64_t bits, int64_t group, bool per_channel, int64_t dim) {
  at::Tensor out = at::empty({probs.size(0), probs.size(1), dim}, probs.options());
  const Rows rows = rows_of(codes, scale, minimum, group, per_channel);
  dispatch(bits, dim, [&](auto bits_, auto dim_) {
    sums_loop<decltype(bits_)::value, decltype(dim_)::value>(probs, rows, out);
  });
  return out;
}
"""


def kernel_ready(dtype: torch.dtype, tensor: QuantizedTensor, dim: int) -> bool:
    """Whether the compiled loop covers this step and is built: a CPU, float32, head_dim 32, 64, 128 or 256, a
    one-byte packing unit, per-token groups of whole bytes."""
    settings = tensor.settings
    codes_per_byte = 8 // settings.bits
    return (
        dtype == torch.float32
        and tensor.codes.device.type == "cpu"
        and tensor.scale.dtype == torch.float32
        and dim in _DIMS
        and settings.bits in _BITS
        and (settings.granularity == "per_channel" or settings.group_size % codes_per_byte == 0)
        and built()
    )


def built() -> bool:
    """Whether the loop is built here (building it on the first call)."""
    return _module() is not None


def key_scores(query: torch.Tensor, tensor: QuantizedTensor) -> torch.Tensor:
    """``query @ dequantize(tensor)^T``: ``[b, h, m, d]`` -> ``[b, h, m, tokens]`` (see :func:`kernel_ready`)."""
    batch, heads, queries, dim = query.shape
    scores = _module().key_scores(query.reshape(-1, queries, dim).contiguous(), *_flat(tensor))
    return scores.view(batch, heads, queries, -1)


def value_sums(probs: torch.Tensor, tensor: QuantizedTensor, dim: int) -> torch.Tensor:
    """``probs @ dequantize(tensor)``: ``[b, h, m, tokens]`` -> ``[b, h, m, dim]`` (see :func:`kernel_ready`)."""
    batch, heads, queries, _ = probs.shape
    sums = _module().value_sums(probs.reshape(-1, queries, probs.shape[-1]).contiguous(), *_flat(tensor), dim)
    return sums.view(batch, heads, queries, dim)


def _flat(tensor: QuantizedTensor) -> tuple:
    """The arguments describing ``tensor`` to the loop: batch and heads flattened, rows contiguous, the minimums
    strided as the scales (the loop reads both with the scales' strides)."""
    settings = tensor.settings
    scale, minimum = _rows_contiguous(tensor.scale), _rows_contiguous(tensor.minimum)
    if scale.stride() != minimum.stride():
        scale, minimum = scale.contiguous(), minimum.contiguous()
    return (
        _rows_contiguous(tensor.codes).flatten(0, 1),
        scale.flatten(0, 1),
        minimum.flatten(0, 1),
        settings.bits,
        settings.group_size,
        settings.granularity == "per_channel",
    )


def _rows_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whose rows (axes 2, 3) are dense and whose batch and heads flatten to one stride; a view if so.

    The cache's buffers are views along axis 2 of larger storage: their rows are dense, heads apart by a stride.
    """
    batch, heads, rows, width = tensor.shape
    dense_rows = tensor.stride(3) == 1 and (rows == 1 or tensor.stride(2) == width)
    one_stride = batch == 1 or heads == 1 or tensor.stride(0) == heads * tensor.stride(1)
    return tensor if dense_rows and one_stride else tensor.contiguous()


#: compiler flags for the vector instructions torch itself dispatches to on this CPU; AVX2 on an AVX-512 CPU too:
#: the loops run over 64 to 256 floats, and GCC 12's 512-bit code for them measured slower (keys 1.9x, values 1.2x)
_ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx2", "-mfma"]}


@functools.cache
def _module():
    """The built extension, or ``None`` (switched off, or no compiler: logged once)."""
    if os.environ.get("INTACTKV_CPU_KERNEL", "1") == "0":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    # -fopenmp: at::parallel_for is inline, over OpenMP in torch's builds; without it the loop runs on one
    # thread (as inductor's C++ kernels, linked against the libgomp torch loads)
    flags = ["-O3", "-ffp-contract=off", "-fopenmp"] + _ISA_FLAGS.get(capability, [])
    logger.info("KV cache: loading the CPU decode loop (built once per CPU capability, about 30 s)")
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name=f"intactkv_cpu_decode_{capability.lower()}",
            cpp_sources=_SOURCE,
            functions=["key_scores", "value_sums"],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # noqa: BLE001 (no compiler or ninja: the torch path is the fallback)
        logger.warning(f"KV cache: the CPU decode loop could not be built, decoding uses torch ops: {error!r:.300}")
        return None
