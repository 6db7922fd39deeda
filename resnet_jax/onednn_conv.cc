// 2-D float32 convolutions through oneDNN, as XLA FFI handlers for XLA CPU (resnet_jax/onednn.py).
//
// Three handlers, one per pass of a convolution NHWC x HWIO -> NHWC with strides and explicit
// padding (no dilation, no groups): the forward pass, the data gradient and the weight gradient.
// Activations stay NHWC (oneDNN's `nhwc`, what PyTorch's channels_last uses); weights are HWIO
// in XLA and whatever blocked layout oneDNN picks inside, reordered on each call (as PyTorch's
// eager oneDNN path does). Primitives are built once per shape and kept; every call gets its own
// scratch memory, so that concurrent calls (several simulated devices) share nothing mutable.
//
// Built by resnet_jax/onednn.py with g++ against the oneDNN headers (Debian: libdnnl-dev).

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

// OpenMP threads per call (0: OpenMP's default), set by OnednnConvSetThreads.
int threads = 0;

enum class Pass { kForward, kData, kWeights };

// A convolution's shape: N, C, H, W (input), O, KH, KW (kernel), strides, paddings.
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Plan {
  dnnl::primitive conv;
  memory::desc weights_md;  // oneDNN's layout of the (diff) weights
  memory::desc scratch_md;
  bool reorder_weights = false;
  dnnl::reorder reorder;  // HWIO <-> weights_md, when they differ
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

memory::dims Dims(std::initializer_list<int64_t> v) { return memory::dims(v.begin(), v.end()); }

// The primitive descriptor of a backward pass `P` (data or weights), in either oneDNN API.
template <class P>
typename P::primitive_desc BackwardDesc(const dnnl::engine& engine, dnnl::algorithm algo,
                                        const memory::desc& src, const memory::desc& weights,
                                        const memory::desc& dst, const memory::dims& strides,
                                        const memory::dims& pad_l, const memory::dims& pad_r,
                                        const dnnl::convolution_forward::primitive_desc& fwd,
                                        const dnnl::primitive_attr& attr) {
#if DNNL_VERSION_MAJOR >= 3
  return typename P::primitive_desc(engine, algo, src, weights, dst, strides, pad_l, pad_r, fwd,
                                    attr);
#else
  return typename P::primitive_desc(
      typename P::desc(algo, src, weights, dst, strides, pad_l, pad_r), attr, engine, fwd);
#endif
}

// The primitive for `pass` of the convolution `key`, built on first use.
const Plan& GetPlan(Pass pass, const Key& key) {
  static std::mutex mutex;
  static std::map<Key, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = plans.find(key);
  if (found != plans.end()) return *found->second;

  auto [p, n, c, h, w, o, kh, kw, sh, sw, ph_lo, ph_hi, pw_lo, pw_hi] = key;
  int64_t oh = (h + ph_lo + ph_hi - kh) / sh + 1, ow = (w + pw_lo + pw_hi - kw) / sw + 1;
  auto f32 = memory::data_type::f32;
  memory::desc src_md(Dims({n, c, h, w}), f32, memory::format_tag::nhwc);
  memory::desc dst_md(Dims({n, o, oh, ow}), f32, memory::format_tag::nhwc);
  memory::desc any_weights_md(Dims({o, c, kh, kw}), f32, memory::format_tag::any);
  memory::desc hwio_md(Dims({o, c, kh, kw}), f32, memory::format_tag::hwio);
  memory::dims strides = Dims({sh, sw}), pad_l = Dims({ph_lo, pw_lo}), pad_r = Dims({ph_hi, pw_hi});
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto& engine = Engine();
  auto prop = dnnl::prop_kind::forward_training;
  auto algo = dnnl::algorithm::convolution_direct;

  auto plan = std::make_unique<Plan>();
#if DNNL_VERSION_MAJOR >= 3
  dnnl::convolution_forward::primitive_desc fwd(engine, prop, algo, src_md, any_weights_md,
                                                dst_md, strides, pad_l, pad_r, attr);
#else
  dnnl::convolution_forward::primitive_desc fwd(
      dnnl::convolution_forward::desc(prop, algo, src_md, any_weights_md, dst_md, strides,
                                      pad_l, pad_r),
      attr, engine);
#endif
  if (static_cast<Pass>(p) == Pass::kForward) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->weights_md = fwd.weights_desc();
    plan->scratch_md = fwd.scratchpad_desc();
  } else if (static_cast<Pass>(p) == Pass::kData) {
    auto bwd = BackwardDesc<dnnl::convolution_backward_data>(
        engine, algo, src_md, any_weights_md, dst_md, strides, pad_l, pad_r, fwd, attr);
    plan->conv = dnnl::convolution_backward_data(bwd);
    plan->weights_md = bwd.weights_desc();
    plan->scratch_md = bwd.scratchpad_desc();
  } else {
    auto bwd = BackwardDesc<dnnl::convolution_backward_weights>(
        engine, algo, src_md, any_weights_md, dst_md, strides, pad_l, pad_r, fwd, attr);
    plan->conv = dnnl::convolution_backward_weights(bwd);
    plan->weights_md = bwd.diff_weights_desc();
    plan->scratch_md = bwd.scratchpad_desc();
  }
  plan->reorder_weights = plan->weights_md != hwio_md;
  if (plan->reorder_weights) {
    bool out = static_cast<Pass>(p) == Pass::kWeights;
    plan->reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
        engine, out ? plan->weights_md : hwio_md, engine, out ? hwio_md : plan->weights_md));
  }
  return *plans.emplace(key, std::move(plan)).first->second;
}

// One pass. x: NHWC input (or its gradient), w: HWIO weights (or their gradient), y: NHWC output
// (or its gradient); `pass` says which of the three is written.
ffi::Error Run(Pass pass, float* x, ffi::Span<const int64_t> x_dims, float* w,
               ffi::Span<const int64_t> w_dims, float* y, int64_t sh, int64_t sw, int64_t ph_lo,
               int64_t ph_hi, int64_t pw_lo, int64_t pw_hi) {
  if (x_dims.size() != 4 || w_dims.size() != 4 || w_dims[2] != x_dims[3])
    return ffi::Error::InvalidArgument("onednn_conv: expected NHWC input and HWIO weights");
  Key key{static_cast<int>(pass), x_dims[0], x_dims[3], x_dims[1], x_dims[2], w_dims[3],
          w_dims[0], w_dims[1], sh, sw, ph_lo, ph_hi, pw_lo, pw_hi};
  // Per calling thread, before the primitive is built for that many threads, and restored
  // after: XLA may run the call on the Python thread, whose OpenMP setting another library in
  // the process (PyTorch, sharing libgomp) would otherwise inherit.
  struct Threads {
    int before = omp_get_max_threads();
    Threads() { if (threads > 0) omp_set_num_threads(threads); }
    ~Threads() { if (threads > 0) omp_set_num_threads(before); }
  } scoped_threads;
  try {
    const Plan& plan = GetPlan(pass, key);
    auto& engine = Engine();
    dnnl::stream stream(engine);
    auto f32 = memory::data_type::f32;
    auto [n, c, h, wd] = std::make_tuple(x_dims[0], x_dims[3], x_dims[1], x_dims[2]);
    int64_t o = w_dims[3], kh = w_dims[0], kw = w_dims[1];
    int64_t oh = (h + ph_lo + ph_hi - kh) / sh + 1, ow = (wd + pw_lo + pw_hi - kw) / sw + 1;
    memory src({Dims({n, c, h, wd}), f32, memory::format_tag::nhwc}, engine, x);
    memory dst({Dims({n, o, oh, ow}), f32, memory::format_tag::nhwc}, engine, y);
    memory hwio({Dims({o, c, kh, kw}), f32, memory::format_tag::hwio}, engine, w);
    // Uninitialised (not std::vector's zeros): oneDNN writes both before it reads them.
    std::unique_ptr<char[]> scratch_buf(new char[plan.scratch_md.get_size()]);
    memory scratch(plan.scratch_md, engine, scratch_buf.get());
    std::unique_ptr<char[]> weights_buf(
        new char[plan.reorder_weights ? plan.weights_md.get_size() : 0]);
    memory weights = plan.reorder_weights
                         ? memory(plan.weights_md, engine, weights_buf.get()) : hwio;
    if (pass == Pass::kForward) {
      if (plan.reorder_weights) plan.reorder.execute(stream, hwio, weights);
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (pass == Pass::kData) {
      if (plan.reorder_weights) plan.reorder.execute(stream, hwio, weights);
      plan.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratch}});
      if (plan.reorder_weights) plan.reorder.execute(stream, weights, hwio);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

ffi::Error Forward(F32 x, F32 w, F32Out y, int64_t sh, int64_t sw, int64_t ph_lo, int64_t ph_hi,
                   int64_t pw_lo, int64_t pw_hi) {
  return Run(Pass::kForward, x.typed_data(), x.dimensions(), w.typed_data(), w.dimensions(),
             y->typed_data(), sh, sw, ph_lo, ph_hi, pw_lo, pw_hi);
}

ffi::Error BackwardData(F32 dy, F32 w, F32Out dx, int64_t sh, int64_t sw, int64_t ph_lo,
                        int64_t ph_hi, int64_t pw_lo, int64_t pw_hi) {
  return Run(Pass::kData, dx->typed_data(), dx->dimensions(), w.typed_data(), w.dimensions(),
             dy.typed_data(), sh, sw, ph_lo, ph_hi, pw_lo, pw_hi);
}

ffi::Error BackwardWeights(F32 x, F32 dy, F32Out dw, int64_t sh, int64_t sw, int64_t ph_lo,
                           int64_t ph_hi, int64_t pw_lo, int64_t pw_hi) {
  return Run(Pass::kWeights, x.typed_data(), x.dimensions(), dw->typed_data(), dw->dimensions(),
             dy.typed_data(), sh, sw, ph_lo, ph_hi, pw_lo, pw_hi);
}

}  // namespace

extern "C" void OnednnConvSetThreads(int n) { threads = n; }

#define CONV_ATTRS                                                                      \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_h_lo")        \
      .Attr<int64_t>("pad_h_hi").Attr<int64_t>("pad_w_lo").Attr<int64_t>("pad_w_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardData,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);
