// CPU kernels of mppo_kernels' token log-likelihood op: log-sum-exp and target logit of every scored row
// (forward), and the hidden / weight / bias gradients (backward), without the [n, V] logits.
//
// Both passes walk (token tile x vocabulary tile) blocks of the logits. A super-block of at most `S` scored
// rows is processed at a time; inside it the vocabulary tiles are split over the threads, so every thread
// owns whole rows of the weight gradient and no two threads write the same output. What a thread keeps is
// bounded by the tile sizes: one [block_m, block_v] logit tile, its weight tile, and (backward) its share
// of the super-block's hidden gradient [S, D], summed over the threads after the super-block.
//
// The logits of a row are z = transform(h . W^T + b), transform(x) = c * tanh(s * x / c) with soft-capping
// (c > 0) and s * x without, exactly as Gemma-2 (c = 30) or Cohere / Granite (s != 1) compute them.
// The scale (and 1 / c) is folded into the hidden tile and bias before the GEMM, so it costs nothing.
// Matrix products go through ATen (MKL / oneDNN), run single-threaded inside the parallel region; sums,
// log-sum-exps and the weight gradient accumulate in fp32 (fp64 for fp64 inputs).

#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

struct Transform {
  double pre;     // multiplies h . W^T + b before tanh (s, or s / c)
  double softcap; // c, or 0 for none
};

Transform make_transform(double logit_scale, double softcap) {
  TORCH_CHECK(logit_scale > 0 && std::isfinite(logit_scale), "logit_scale must be finite and > 0");
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "softcap must be finite and >= 0 (0 = none)");
  return {softcap > 0 ? logit_scale / softcap : logit_scale, softcap};
}

// Rows of a super-block: `max_rows` when given (> 0), else as many as keep every thread's [S, D] share of
// the hidden gradient within 8 MiB in all. A multiple of block_m, at least one tile.
int64_t super_block_rows(int64_t n, int64_t D, int64_t block_m, int64_t threads, int64_t max_rows) {
  int64_t s = max_rows;
  if (s <= 0) s = (int64_t{8} << 20) / (4 * std::max<int64_t>(D, 1) * std::max<int64_t>(threads, 1));
  s = std::max(block_m, (s / block_m) * block_m);
  return std::min(n, s);
}

// What both passes derive from their inputs before the super-block loop.
struct Plan {
  Tensor rows, targets;             // [n] int64, contiguous
  int64_t threads, S, v_tiles;      // threads sharing a super-block's vocabulary tiles, its rows, the tiles
  c10::optional<Tensor> bias;       // pre * bias in the accumulation dtype
};

Plan make_plan(const Tensor& rows, const Tensor& targets, const c10::optional<Tensor>& bias, const Transform& tf,
               at::ScalarType acc, int64_t V, int64_t D, int64_t block_m, int64_t block_v, int64_t max_rows) {
  const int64_t threads = at::get_num_threads();
  return {rows.to(at::kLong).contiguous(), targets.to(at::kLong).contiguous(), threads,
          super_block_rows(rows.size(0), D, block_m, threads, max_rows), (V + block_v - 1) / block_v,
          bias.has_value() ? c10::optional<Tensor>(bias->to(acc).mul(tf.pre)) : c10::nullopt};
}

// Logit tile z = transform(h . w^T + b), written into `z`; `h` and `b` come pre-scaled (Plan). With
// soft-capping z = c * t, t = tanh(u), and `t_out` (when given) receives t for the backward's derivative.
void logits_tile(const Tensor& h, const Tensor& w, const c10::optional<Tensor>& b, const Transform& tf,
                 Tensor& z, Tensor* t_out) {
  if (b.has_value()) {
    at::addmm_out(z, *b, h, w.t());
  } else {
    at::mm_out(z, h, w.t());
  }
  if (tf.softcap > 0) {
    z.tanh_();
    if (t_out != nullptr) t_out->copy_(z);
    z.mul_(tf.softcap);
  }
}

// Forward: (lse [n], target_logit [n]) in the accumulation dtype. `hidden` [N, D], `weight` [V, D],
// `bias` [V] or none, `rows` [n] int64 ids into hidden, `targets` [n] int64 (out of range: NaN result).
std::tuple<Tensor, Tensor> cpu_forward(const Tensor& hidden, const Tensor& weight, const c10::optional<Tensor>& bias,
                                       const Tensor& rows, const Tensor& targets, double logit_scale, double softcap,
                                       int64_t block_m, int64_t block_v, int64_t max_rows) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden [N, D] and weight [V, D] must share D");
  TORCH_CHECK(rows.dim() == 1 && targets.dim() == 1 && rows.size(0) == targets.size(0),
              "rows and targets must be [n]");
  TORCH_CHECK(block_m > 0 && block_v > 0, "block sizes must be positive");
  at::NoGradGuard no_grad;  // called with the autograd inputs of the op; only the op's own autograd applies
  const Transform tf = make_transform(logit_scale, softcap);
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = hidden.options().dtype(acc);
  const int64_t n = rows.size(0), V = weight.size(0), D = weight.size(1);
  Tensor lse = at::full({n}, -std::numeric_limits<double>::infinity(), opts);
  Tensor target_logit = at::full({n}, std::numeric_limits<double>::quiet_NaN(), opts);
  if (n == 0) return {lse, target_logit};
  const Plan plan = make_plan(rows, targets, bias, tf, acc, V, D, block_m, block_v, max_rows);
  const Tensor &rows64 = plan.rows, &tgt = plan.targets;
  const int64_t threads = plan.threads, S = plan.S, v_tiles = plan.v_tiles;
  const c10::optional<Tensor>& bias_acc = plan.bias;

  for (int64_t s0 = 0; s0 < n; s0 += S) {
    const int64_t s1 = std::min(n, s0 + S);
    const Tensor h = hidden.index_select(0, rows64.slice(0, s0, s1)).to(acc).mul_(tf.pre);  // [S, D]
    const int64_t* y = tgt.data_ptr<int64_t>() + s0;
    // Per thread: running max and sum-exp of every row over the thread's vocabulary tiles.
    Tensor part_max = at::full({threads, s1 - s0}, -std::numeric_limits<double>::infinity(), opts);
    Tensor part_sum = at::zeros({threads, s1 - s0}, opts);
    at::parallel_for(0, v_tiles, 1, [&](int64_t t0, int64_t t1) {
      at::NoGradGuard no_grad_here;  // grad mode is thread-local: OpenMP workers do not inherit the caller's
      const int64_t tid = at::get_thread_num();
      Tensor z = at::empty({block_m, block_v}, opts);
      Tensor run_max = part_max[tid], run_sum = part_sum[tid];
      for (int64_t vt = t0; vt < t1; ++vt) {
        const int64_t v0 = vt * block_v, v1 = std::min(V, v0 + block_v);
        const Tensor w = weight.slice(0, v0, v1).to(acc);
        const c10::optional<Tensor> b =
            bias_acc.has_value() ? c10::optional<Tensor>(bias_acc->slice(0, v0, v1)) : c10::nullopt;
        for (int64_t i0 = 0; i0 < s1 - s0; i0 += block_m) {
          const int64_t i1 = std::min(s1 - s0, i0 + block_m);
          Tensor zt = z.slice(0, 0, i1 - i0).slice(1, 0, v1 - v0);
          logits_tile(h.slice(0, i0, i1), w, b, tf, zt, nullptr);
          AT_DISPATCH_FLOATING_TYPES(zt.scalar_type(), "mppo_cpu_forward_pick", [&] {
            auto za = zt.accessor<scalar_t, 2>();
            auto out = target_logit.accessor<scalar_t, 1>();
            for (int64_t i = i0; i < i1; ++i) {
              const int64_t yi = y[i];
              if (yi >= v0 && yi < v1) out[s0 + i] = za[i - i0][yi - v0];  // one tile of one thread holds it
            }
          });
          // Online log-sum-exp. A row whose logits are all -inf so far (a bias banning a block of tokens)
          // has no finite max; shifting by 0 keeps its sum 0 instead of computing exp(-inf - (-inf)).
          Tensor m_old = run_max.slice(0, i0, i1);
          Tensor m_new = at::maximum(m_old, zt.amax(1));
          Tensor shift = at::where(at::isinf(m_new) & (m_new < 0), at::zeros_like(m_new), m_new);
          Tensor tile_sum = zt.sub_(shift.unsqueeze(1)).exp_().sum(1);  // the tile is scratch from here on
          Tensor s_old = run_sum.slice(0, i0, i1);
          s_old.mul_((m_old - shift).exp_()).add_(tile_sum);
          m_old.copy_(m_new);
        }
      }
    });
    // Merge the threads: lse = M + log sum_t sum_t * exp(max_t - M).
    Tensor top = std::get<0>(part_max.max(0));
    Tensor safe = at::where(at::isinf(top) & (top < 0), at::zeros_like(top), top);
    lse.slice(0, s0, s1).copy_(safe + (part_sum * (part_max - safe.unsqueeze(0)).exp()).sum(0).log());
  }
  return {lse, target_logit};
}

// Backward: (d_hidden_rows [n, D] acc, d_weight [V, D] weight dtype, d_bias [V] acc); gradients not asked for
// come back as empty tensors. `grad` [n] is dL/d(token log-prob) of every row, `lse` the forward's.
std::tuple<Tensor, Tensor, Tensor> cpu_backward(const Tensor& grad, const Tensor& hidden, const Tensor& weight,
                                                const c10::optional<Tensor>& bias, const Tensor& rows,
                                                const Tensor& targets, const Tensor& lse, double logit_scale,
                                                double softcap, int64_t block_m, int64_t block_v, int64_t max_rows,
                                                bool need_hidden, bool need_weight, bool need_bias) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden [N, D] and weight [V, D] must share D");
  TORCH_CHECK(grad.size(0) == rows.size(0) && lse.size(0) == rows.size(0) && targets.size(0) == rows.size(0),
              "grad, lse, rows and targets must all be [n]");
  at::NoGradGuard no_grad;
  const Transform tf = make_transform(logit_scale, softcap);
  const auto acc = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = hidden.options().dtype(acc);
  const int64_t n = rows.size(0), V = weight.size(0), D = weight.size(1);
  need_bias = need_bias && bias.has_value();
  Tensor d_rows = need_hidden ? at::zeros({n, D}, opts) : at::empty({0}, opts);
  // The weight gradient accumulates over super-blocks in place when it is fp32; a bf16 / fp16 weight needs
  // an fp32 accumulator of its size (rounding partial sums to 8 bits of mantissa would lose them).
  const bool direct = weight.scalar_type() == acc;
  Tensor d_w_acc = need_weight ? at::zeros({V, D}, opts) : at::empty({0}, opts);
  Tensor d_b = need_bias ? at::zeros({V}, opts) : at::empty({0}, opts);
  if (n > 0 && (need_hidden || need_weight || need_bias)) {
    const Plan plan = make_plan(rows, targets, bias, tf, acc, V, D, block_m, block_v, max_rows);
    const Tensor &rows64 = plan.rows, &tgt = plan.targets;
    const int64_t threads = plan.threads, S = plan.S, v_tiles = plan.v_tiles;
    const c10::optional<Tensor>& bias_acc = plan.bias;
    const Tensor g_all = grad.to(acc).contiguous();
    const Tensor lse_all = lse.to(acc).contiguous();
    for (int64_t s0 = 0; s0 < n; s0 += S) {
      const int64_t s1 = std::min(n, s0 + S), m = s1 - s0;
      const Tensor h_raw = hidden.index_select(0, rows64.slice(0, s0, s1)).to(acc);  // [S, D]
      const Tensor h = tf.pre == 1.0 ? h_raw : h_raw.mul(tf.pre);
      const Tensor g = g_all.slice(0, s0, s1), l = lse_all.slice(0, s0, s1), neg_g = g.neg().unsqueeze(1);
      const int64_t* y = tgt.data_ptr<int64_t>() + s0;
      Tensor part_dh = need_hidden ? at::zeros({threads, m, D}, opts) : Tensor();
      at::parallel_for(0, v_tiles, 1, [&](int64_t t0, int64_t t1) {
        at::NoGradGuard no_grad_here;
        const int64_t tid = at::get_thread_num();
        Tensor z = at::empty({block_m, block_v}, opts);
        Tensor t = tf.softcap > 0 ? at::empty({block_m, block_v}, opts) : Tensor();
        for (int64_t vt = t0; vt < t1; ++vt) {
          const int64_t v0 = vt * block_v, v1 = std::min(V, v0 + block_v);
          const Tensor w = weight.slice(0, v0, v1).to(acc);
          const c10::optional<Tensor> b =
              bias_acc.has_value() ? c10::optional<Tensor>(bias_acc->slice(0, v0, v1)) : c10::nullopt;
          for (int64_t i0 = 0; i0 < m; i0 += block_m) {
            const int64_t i1 = std::min(m, i0 + block_m);
            Tensor zt = z.slice(0, 0, i1 - i0).slice(1, 0, v1 - v0);
            Tensor tt = tf.softcap > 0 ? t.slice(0, 0, i1 - i0).slice(1, 0, v1 - v0) : Tensor();
            logits_tile(h.slice(0, i0, i1), w, b, tf, zt, tf.softcap > 0 ? &tt : nullptr);
            // dz = g * (onehot(y) - softmax), then through the transform: d/du [c tanh(u)] = c (1 - t^2),
            // and u = (s / c) x, so dx = dz * s * (1 - t^2); without soft-capping dx = dz * s.
            zt.sub_(l.slice(0, i0, i1).unsqueeze(1)).exp_().mul_(neg_g.slice(0, i0, i1));
            AT_DISPATCH_FLOATING_TYPES(zt.scalar_type(), "mppo_cpu_backward_onehot", [&] {
              auto za = zt.accessor<scalar_t, 2>();
              auto ga = g.accessor<scalar_t, 1>();
              for (int64_t i = i0; i < i1; ++i) {
                const int64_t yi = y[i];
                if (yi >= v0 && yi < v1) za[i - i0][yi - v0] += ga[i];
              }
            });
            if (tf.softcap > 0) zt.mul_(1 - tt * tt);
            const double s = tf.softcap > 0 ? tf.pre * tf.softcap : tf.pre;
            if (need_weight) {  // rows [v0, v1) belong to this thread alone
              Tensor dw = d_w_acc.slice(0, v0, v1);
              dw.addmm_(zt.t(), h_raw.slice(0, i0, i1), 1.0, s);
            }
            if (need_hidden) {
              Tensor dh = part_dh[tid].slice(0, i0, i1);
              dh.addmm_(zt, w, 1.0, s);
            }
            if (need_bias) d_b.slice(0, v0, v1).add_(zt.sum(0), s);
          }
        }
      });
      if (need_hidden) d_rows.slice(0, s0, s1).copy_(part_dh.sum(0));
    }
  }
  Tensor d_w = need_weight ? (direct ? d_w_acc : d_w_acc.to(weight.scalar_type())) : at::empty({0}, weight.options());
  return {d_rows, d_w, d_b};
}

}  // namespace

TORCH_LIBRARY(mppo_kernels_cpu, m) {
  m.def("forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor rows, Tensor targets, float logit_scale, "
        "float softcap, int block_m, int block_v, int max_rows) -> (Tensor, Tensor)");
  m.def("backward(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, Tensor rows, Tensor targets, "
        "Tensor lse, float logit_scale, float softcap, int block_m, int block_v, int max_rows, bool need_hidden, "
        "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mppo_kernels_cpu, CPU, m) {
  m.impl("forward", &cpu_forward);
  m.impl("backward", &cpu_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels of mppo_kernels (registered as torch.ops.mppo_kernels_cpu.forward / backward)";
}
