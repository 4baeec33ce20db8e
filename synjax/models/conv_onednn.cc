// 3D convolution (any stride, kernel dilation and zero padding) forward and
// gradients through oneDNN, as XLA FFI handlers for JAX on CPU.
//
// Why: XLA:CPU runs 3D convolutions on a generic path (about a quarter of the
// matmul peak on a 2-core EPYC) while oneDNN's brgemm convolutions, which
// PyTorch calls, run at the matmul peak. Layouts are JAX's: activations
// [batch, z, y, x, channels] ("ndhwc") and kernels [kz, ky, kx, in, out]
// ("dhwio"), row-major, so no transposes are needed on either side.
//
// Built on first use by synjax/models/conv_onednn.py (g++, headers of the
// onednn-devel wheel and of jaxlib). Primitives are cached per shape, dtype,
// strides, dilation and padding; kernels are reordered into the primitive's
// preferred layout on each call (they are small next to the activations).

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

bool ToDnnlType(ffi::DataType type, memory::data_type* out) {
  switch (type) {
    case ffi::DataType::F32:
      *out = memory::data_type::f32;
      return true;
    case ffi::DataType::BF16:
      *out = memory::data_type::bf16;
      return true;
    default:
      return false;
  }
}

// A problem: input, kernel and output shapes in oneDNN's logical order
// ([n, c, d, h, w], [f, c, kd, kh, kw], [n, f, d', h', w']), strides, kernel
// dilation in oneDNN's convention (0 = none) and the low/high zero padding.
struct Problem {
  memory::dims src, wei, dst;
  memory::dims strides, dilation, pad_lo, pad_hi;
  memory::data_type src_type, wei_type, dst_type;

  auto Key(int kind) const {
    return std::make_tuple(kind, src, wei, dst, strides, dilation, pad_lo, pad_hi,
                           static_cast<int>(src_type), static_cast<int>(wei_type),
                           static_cast<int>(dst_type));
  }
};

using Key = decltype(std::declval<Problem>().Key(0));

memory::desc Activations(const memory::dims& dims, memory::data_type type) {
  return memory::desc(dims, type, memory::format_tag::ndhwc);
}

memory::desc AnyLayout(const memory::dims& dims, memory::data_type type) {
  return memory::desc(dims, type, memory::format_tag::any);
}

// XLA may run independent custom calls on several threads at once; oneDNN's
// library-managed scratchpad is shared between primitives, so each call brings
// its own (a per-thread buffer, `Scratchpad`).
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Problem& p) {
  // Weights in "any" layout: oneDNN picks its blocked layout for the fast
  // kernels; activations stay in JAX's channels-last layout.
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Activations(p.src, p.src_type), AnyLayout(p.wei, p.wei_type),
      Activations(p.dst, p.dst_type), p.strides, p.dilation, p.pad_lo, p.pad_hi,
      UserScratchpad());
}

// One cached primitive with its descriptor, and the kernel's user layout.
struct Cached {
  dnnl::primitive primitive;
  memory::desc weights;       // the primitive's (possibly blocked) kernel layout
  memory::desc user_weights;  // the kernel as JAX holds it
  memory::desc scratchpad;    // the primitive's scratchpad
  memory::desc src = {};      // backward weights: the primitive's input layout
  memory::desc dst = {};      // backward weights: its output-gradient layout
};

// The calling thread's scratchpad memory for `cached`, grown as needed.
memory Scratchpad(const Cached& cached) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < cached.scratchpad.get_size()) buffer.resize(cached.scratchpad.get_size());
  return memory(cached.scratchpad, Engine(), buffer.data());
}

std::mutex cache_mutex;
std::map<Key, std::shared_ptr<Cached>> cache;

template <typename Make>
std::shared_ptr<Cached> Lookup(const Key& key, Make make) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto made = std::make_shared<Cached>(make());
  cache.emplace(key, made);
  return made;
}

memory::desc UserWeights(const Problem& p) {
  return memory::desc(p.wei, p.wei_type, memory::format_tag::dhwio);
}

// Checks one call's shapes, strides, dilation, padding and dtypes and fills
// `p` from them. `activations` is [n, d, h, w, c] (x or grad_x), `kernel`
// [kd, kh, kw, c, f] (kernel or grad_kernel), `output` [n, d', h', w', f] (y or
// grad_y); `dilation` is lax's (1 = none); `step` names the handler in the
// error. oneDNN checks that the output size agrees with the rest.
ffi::Error MakeProblem(const char* step, ffi::Span<const int64_t> activations,
                       ffi::Span<const int64_t> kernel, ffi::Span<const int64_t> output,
                       ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                       ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi,
                       ffi::DataType src_type, ffi::DataType wei_type, ffi::DataType dst_type,
                       Problem* p) {
  if (strides.size() != 3 || dilation.size() != 3 || pad_lo.size() != 3 || pad_hi.size() != 3) {
    return ffi::Error::InvalidArgument(std::string(step) +
                                       ": 3 strides, dilations, low and high paddings expected");
  }
  const auto& a = activations;
  const auto& k = kernel;
  const auto& o = output;
  if (a.size() != 5 || k.size() != 5 || o.size() != 5 || k[3] != a[4] || o[4] != k[4] ||
      o[0] != a[0]) {
    return ffi::Error::InvalidArgument(
        std::string(step) + ": shapes [n,d,h,w,c], [kd,kh,kw,c,f] and [n,d',h',w',f] expected");
  }
  p->src = {a[0], a[4], a[1], a[2], a[3]};
  p->wei = {k[4], k[3], k[0], k[1], k[2]};
  p->dst = {o[0], o[4], o[1], o[2], o[3]};
  p->strides.assign(strides.begin(), strides.end());
  p->dilation.clear();
  for (int64_t d : dilation) p->dilation.push_back(d - 1);
  p->pad_lo.assign(pad_lo.begin(), pad_lo.end());
  p->pad_hi.assign(pad_hi.begin(), pad_hi.end());
  if (!ToDnnlType(src_type, &p->src_type) || !ToDnnlType(wei_type, &p->wei_type) ||
      !ToDnnlType(dst_type, &p->dst_type)) {
    return ffi::Error::InvalidArgument(std::string(step) + ": float32 or bfloat16 expected");
  }
  return ffi::Error::Success();
}

// The array at `data` (laid out as `user`) in the primitive's layout `wanted`:
// the same memory where they agree, else a reordered copy.
memory InLayout(const memory::desc& wanted, const memory::desc& user, void* data,
                dnnl::stream& stream) {
  memory given(user, Engine(), data);
  if (wanted == user) return given;
  memory reordered(wanted, Engine());
  dnnl::reorder(given, reordered).execute(stream, given, reordered);
  return reordered;
}

// The kernel at `data` (JAX's layout) in the primitive's layout.
memory KernelForPrimitive(const Cached& cached, void* data, dnnl::stream& stream) {
  return InLayout(cached.weights, cached.user_weights, data, stream);
}

// x: [n, d, h, w, c]; kernel: [kd, kh, kw, c, f]; y: [n, d', h', w', f].
ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::Span<const int64_t> strides,
                   ffi::Span<const int64_t> dilation, ffi::Span<const int64_t> pad_lo,
                   ffi::Span<const int64_t> pad_hi, ffi::Result<ffi::AnyBuffer> y) {
  Problem p;
  if (auto error = MakeProblem("conv3d forward", x.dimensions(), kernel.dimensions(),
                               y->dimensions(), strides, dilation, pad_lo, pad_hi,
                               x.element_type(), kernel.element_type(), y->element_type(), &p);
      error.failure()) {
    return error;
  }
  try {
    auto cached = Lookup(p.Key(0), [&] {
      auto pd = ForwardDesc(p);
      return Cached{dnnl::convolution_forward(pd), pd.weights_desc(), UserWeights(p),
                    pd.scratchpad_desc()};
    });
    dnnl::stream stream(Engine());
    memory weights = KernelForPrimitive(*cached, kernel.untyped_data(), stream);
    memory src(Activations(p.src, p.src_type), Engine(), x.untyped_data());
    memory dst(Activations(p.dst, p.dst_type), Engine(), y->untyped_data());
    cached->primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                       {DNNL_ARG_WEIGHTS, weights},
                                       {DNNL_ARG_DST, dst},
                                       {DNNL_ARG_SCRATCHPAD, Scratchpad(*cached)}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN conv3d forward: ") + e.what());
  }
  return ffi::Error::Success();
}

// grad_y: [n, d', h', w', f]; kernel: [kd, kh, kw, c, f]; grad_x: [n, d, h, w, c].
ffi::Error BackwardData(ffi::AnyBuffer grad_y, ffi::AnyBuffer kernel,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                        ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi,
                        ffi::Result<ffi::AnyBuffer> grad_x) {
  Problem p;
  if (auto error = MakeProblem("conv3d backward data", grad_x->dimensions(), kernel.dimensions(),
                               grad_y.dimensions(), strides, dilation, pad_lo, pad_hi,
                               grad_x->element_type(), kernel.element_type(),
                               grad_y.element_type(), &p);
      error.failure()) {
    return error;
  }
  try {
    auto cached = Lookup(p.Key(1), [&] {
      auto hint = ForwardDesc(p);
      auto pd = dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, Activations(p.src, p.src_type),
          AnyLayout(p.wei, p.wei_type), Activations(p.dst, p.dst_type), p.strides, p.dilation,
          p.pad_lo, p.pad_hi, hint, UserScratchpad());
      return Cached{dnnl::convolution_backward_data(pd), pd.weights_desc(),
                    UserWeights(p), pd.scratchpad_desc()};
    });
    dnnl::stream stream(Engine());
    memory weights = KernelForPrimitive(*cached, kernel.untyped_data(), stream);
    memory diff_dst(Activations(p.dst, p.dst_type), Engine(), grad_y.untyped_data());
    memory diff_src(Activations(p.src, p.src_type), Engine(), grad_x->untyped_data());
    cached->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst},
                                       {DNNL_ARG_WEIGHTS, weights},
                                       {DNNL_ARG_DIFF_SRC, diff_src},
                                       {DNNL_ARG_SCRATCHPAD, Scratchpad(*cached)}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN conv3d backward data: ") + e.what());
  }
  return ffi::Error::Success();
}

// x: [n, d, h, w, c]; grad_y: [n, d', h', w', f]; grad_kernel: [kd, kh, kw, c, f].
ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer grad_y,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
                           ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi,
                           ffi::Result<ffi::AnyBuffer> grad_kernel) {
  Problem p;
  if (auto error = MakeProblem("conv3d backward weights", x.dimensions(),
                               grad_kernel->dimensions(), grad_y.dimensions(), strides, dilation,
                               pad_lo, pad_hi, x.element_type(), grad_kernel->element_type(),
                               grad_y.element_type(), &p);
      error.failure()) {
    return error;
  }
  try {
    auto cached = Lookup(p.Key(2), [&] {
      Problem forward = p;
      forward.wei_type = p.src_type;  // the forward hint had kernels of the input's type
      auto hint = ForwardDesc(forward);
      // Strided: oneDNN's kernel on channels-last activations ran at ~90 GFLOP/s
      // (3x3 stride-2 192 -> 192 on 128 x 128: 29 ms), on its blocked ones 6 ms
      // plus 3 ms of reorders; stride 1 stays channels-last (a 3x3x3 72 -> 72
      // of [1, 10, 74, 74, 72]: 46 ms there, 42 ms plus 9 ms of reorders blocked).
      bool strided = false;
      for (int64_t s : p.strides) strided = strided || s > 1;
      auto layout = [&](const memory::dims& dims, memory::data_type type) {
        return strided ? AnyLayout(dims, type) : Activations(dims, type);
      };
      auto pd = dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, layout(p.src, p.src_type),
          AnyLayout(p.wei, p.wei_type), layout(p.dst, p.dst_type), p.strides, p.dilation,
          p.pad_lo, p.pad_hi, hint, UserScratchpad());
      return Cached{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(),
                    UserWeights(p), pd.scratchpad_desc(), pd.src_desc(), pd.diff_dst_desc()};
    });
    dnnl::stream stream(Engine());
    // Activations into the primitive's layout where it is not channels-last.
    memory src =
        InLayout(cached->src, Activations(p.src, p.src_type), x.untyped_data(), stream);
    memory diff_dst =
        InLayout(cached->dst, Activations(p.dst, p.dst_type), grad_y.untyped_data(), stream);
    memory user_weights(cached->user_weights, Engine(), grad_kernel->untyped_data());
    memory weights = user_weights;
    if (cached->weights != cached->user_weights) weights = memory(cached->weights, Engine());
    cached->primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                       {DNNL_ARG_DIFF_DST, diff_dst},
                                       {DNNL_ARG_DIFF_WEIGHTS, weights},
                                       {DNNL_ARG_SCRATCHPAD, Scratchpad(*cached)}});
    if (cached->weights != cached->user_weights) {
      dnnl::reorder(weights, user_weights).execute(stream, weights, user_weights);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN conv3d backward weights: ") + e.what());
  }
  return ffi::Error::Success();
}

// The three handlers' signature: two arrays, the geometry, one result.
auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("dilation")
      .Attr<ffi::Span<const int64_t>>("pad_lo")
      .Attr<ffi::Span<const int64_t>>("pad_hi")
      .Ret<ffi::AnyBuffer>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynjaxConv3dForward, Forward, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynjaxConv3dBackwardData, BackwardData, ConvBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynjaxConv3dBackwardWeights, BackwardWeights, ConvBinding());
