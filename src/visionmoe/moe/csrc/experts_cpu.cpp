// The expert loop of visionmoe's fused CPU kernel (visionmoe/moe/experts.py, _FusedSortedMLP),
// run inside one at::parallel_for: group g of experts on OpenMP thread g, every op inside it
// single-threaded (ATen and MKL do not nest parallelism). Without it the experts run one after
// another (a former Python thread pool lost to that loop and was removed: docs/performance.md,
// "Keep only what wins"). Here the libgomp worker runs the second group itself.
//
// Rows are sorted by expert: expert e owns rows starts[e] .. starts[e+1]-1 of every (N, .)
// tensor, and writes only those rows and its own slice of the (E, ...) gradients, so the
// result does not depend on the thread count. Used for experts of >= 256 rows (measured: a
// few per cent faster than the serial loop at those sizes, docs/performance.md); built by
// `visionmoe build-native` (visionmoe.moe.native).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <optional>
#include <string>
#include <vector>

using at::Tensor;

namespace {

void check_plan(const std::vector<int64_t>& starts, const std::vector<int64_t>& order,
                const std::vector<int64_t>& bounds, int64_t num_experts, int64_t rows) {
  TORCH_CHECK((int64_t)starts.size() == num_experts + 1, "starts needs E + 1 entries");
  TORCH_CHECK(starts.front() == 0 && starts.back() == rows, "starts must run from 0 to the row count");
  TORCH_CHECK((int64_t)order.size() == num_experts, "order must list every expert once");
  TORCH_CHECK(bounds.size() >= 2 && bounds.front() == 0 && bounds.back() == num_experts,
              "bounds must run from 0 to E");
  for (int64_t e : order) TORCH_CHECK(e >= 0 && e < num_experts, "expert index out of range");
}

// fn(e) for every expert, group g (experts order[bounds[g] .. bounds[g+1]-1]) on thread g
template <typename F>
void run_groups(const std::vector<int64_t>& order, const std::vector<int64_t>& bounds, const F& fn) {
  const int64_t groups = (int64_t)bounds.size() - 1;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t i = bounds[g]; i < bounds[g + 1]; ++i) fn(order[i]);
  });
}

}  // namespace

// h = xs @ w1[e].T + b1[e]; a = gelu(h) (into `a` when saved, else into `buf`); ys = a @ w2[e].T + b2[e]
void experts_forward(const Tensor& xs, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                     const std::optional<Tensor>& b2, Tensor h, std::optional<Tensor> a, Tensor buf, Tensor ys,
                     const std::vector<int64_t>& starts, const std::vector<int64_t>& order,
                     const std::vector<int64_t>& bounds, const std::string& approximate) {
  check_plan(starts, order, bounds, w1.size(0), xs.size(0));
  run_groups(order, bounds, [&](int64_t e) {
    const int64_t s = starts[e], t = starts[e + 1];
    if (s == t) return;
    Tensor he = h.slice(0, s, t), ae = (a ? *a : buf).slice(0, s, t), ye = ys.slice(0, s, t);
    if (b1) at::addmm_out(he, (*b1)[e], xs.slice(0, s, t), w1[e].t());
    else at::mm_out(he, xs.slice(0, s, t), w1[e].t());
    at::gelu_out(ae, he, approximate);
    if (b2) at::addmm_out(ye, (*b2)[e], ae, w2[e].t());
    else at::mm_out(ye, ae, w2[e].t());
  });
}

// given g = dL/dys: gw2[e] = g.T @ a, grad_h = gelu'(h) * (g @ w2[e]), gw1[e] = grad_h.T @ xs,
// gxs = grad_h @ w1[e], gb1[e] = sum(grad_h), gb2[e] = sum(g); `buf` (N, H) holds the recomputed
// activation (when `a` was not saved) and then grad_h; experts without rows get zero gradients
void experts_backward(const Tensor& g, const Tensor& xs, const Tensor& h, const std::optional<Tensor>& a,
                      const Tensor& w1, const Tensor& w2, Tensor gw1, std::optional<Tensor> gb1, Tensor gw2,
                      std::optional<Tensor> gb2, Tensor gxs, Tensor buf, const std::vector<int64_t>& starts,
                      const std::vector<int64_t>& order, const std::vector<int64_t>& bounds,
                      const std::string& approximate) {
  check_plan(starts, order, bounds, w1.size(0), xs.size(0));
  run_groups(order, bounds, [&](int64_t e) {
    const int64_t s = starts[e], t = starts[e + 1];
    Tensor gw1e = gw1[e], gw2e = gw2[e];
    if (s == t) {
      gw1e.zero_();
      gw2e.zero_();
      if (gb1) (*gb1)[e].zero_();
      if (gb2) (*gb2)[e].zero_();
      return;
    }
    Tensor ge = g.slice(0, s, t), he = h.slice(0, s, t), be = buf.slice(0, s, t);
    Tensor ae = a ? a->slice(0, s, t) : at::gelu_out(be, he, approximate);
    at::mm_out(gw2e, ge.t(), ae);
    at::mm_out(be, ge, w2[e]);  // dL/da (overwrites a recomputed activation, no longer needed)
    at::gelu_backward_out(be, be, he, approximate);  // dL/dh, in place
    at::mm_out(gw1e, be.t(), xs.slice(0, s, t));
    Tensor gx = gxs.slice(0, s, t);
    at::mm_out(gx, be, w1[e]);
    const std::vector<int64_t> rows_dim{0};
    if (gb1) {
      Tensor gb1e = (*gb1)[e];
      at::sum_out(gb1e, be, rows_dim);
    }
    if (gb2) {
      Tensor gb2e = (*gb2)[e];
      at::sum_out(gb2e, ge, rows_dim);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("experts_forward", &experts_forward, py::call_guard<py::gil_scoped_release>());
  m.def("experts_backward", &experts_backward, py::call_guard<py::gil_scoped_release>());
}
