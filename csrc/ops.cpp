// Every schema of prunedm's compiled ops, in one place, and the Python module prunedm._C.
// Backends register implementations against these schemas: csrc/cpu (CPU), csrc/cuda (CUDA);
// fake (meta) implementations for torch.compile live in prunedm/ops/_fake.py.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>

TORCH_LIBRARY(prunedm, m) {
  // Bool mask keeping the n largest |w| of each m consecutive elements along the last dim.
  m.def("nm_mask(Tensor weight, int n, int m) -> Tensor");
  // Number of m-wide groups along the last dim with more than n non-zeros (int64 scalar).
  m.def("nm_violations(Tensor t, int n, int m) -> Tensor");
  // 2:4 compression of a 2-D fp16/bf16 matrix: (values [R, C/2], meta [R, C/16] int16, sm80 layout).
  m.def("compress_2to4(Tensor dense) -> (Tensor, Tensor)");
  // Inverse of compress_2to4.
  m.def("decompress_2to4(Tensor values, Tensor meta) -> Tensor");
  // [Cout, Cin, kh, kw] <-> [Cout, kh*kw*Cin] with K in (kh, kw, Cin) order (NHWC implicit GEMM).
  m.def("conv_weight_to_matrix(Tensor w) -> Tensor");
  m.def("matrix_to_conv_weight(Tensor mat, int[] shape) -> Tensor");
  // Gumbel N:M sampling (noise: Philox4x32-10 keyed by seed and each element's flat index plus offset,
  // csrc/include/prunedm/philox.h, so a shard starting at flat element `offset` of a larger tensor samples
  // exactly that tensor's slice). Groups of m along the last dim keep the top n of logits + Gumbel noise:
  // hard=true gives the 0/1 mask, hard=false the relaxation (successive softmaxes of the keys / tau,
  // prunedm/gumbel.h), both in logits' dtype.
  m.def("gumbel_nm_sample(Tensor logits, int n, int m, float tau, bool hard, int seed, int offset=0) -> Tensor");
  // Gradient of the relaxation with respect to logits, recomputing noise and relaxation from the seed.
  m.def(
      "gumbel_nm_sample_backward(Tensor grad, Tensor logits, int n, int m, float tau, int seed, int offset=0) -> "
      "Tensor");
  // MaskLLM-style sampling over the C(m, n) candidate patterns of each group (lexicographic):
  // pattern_logits [..., G, C(m, n)] -> mask [..., G*m]; hard=true: the pattern with the largest
  // logit + noise; hard=false: softmax((logits + noise) / tau) @ patterns.
  m.def(
      "gumbel_pattern_sample(Tensor pattern_logits, int n, int m, float tau, bool hard, int seed, int offset=0) -> "
      "Tensor");
  m.def(
      "gumbel_pattern_sample_backward(Tensor grad, Tensor pattern_logits, int n, int m, float tau, int seed, "
      "int offset=0) -> Tensor");
  // 2:4 sparse linear with a fused epilogue: act(input @ W.T + bias) + residual, W = decompress_2to4(values,
  // meta) [out, K]; input [..., K]; activation one of none, relu, silu, gelu, gelu_tanh (prunedm/sparse_gemm.h).
  m.def(
      "sparse_linear_2to4(Tensor input, Tensor values, Tensor meta, Tensor? bias, str activation, Tensor? residual) "
      "-> Tensor");
  // 2:4 sparse Conv2d (groups = 1) as an implicit GEMM: act(conv2d(input, W, bias)) + residual with
  // W = matrix_to_conv_weight(decompress_2to4(values, meta), weight_shape), K in (kh, kw, Cin) order
  // (prunedm/implicit_gemm.h); stride/padding/dilation are (h, w). The output is channels_last when
  // the input is.
  m.def(
      "sparse_conv2d_2to4(Tensor input, Tensor values, Tensor meta, int[] weight_shape, Tensor? bias, int[] stride, "
      "int[] padding, int[] dilation, str activation, Tensor? residual) -> Tensor");
}

namespace {

// A pure layout change: expressed with views, it runs on every device and autograd sees it.
at::Tensor conv_weight_to_matrix(const at::Tensor& w) {
  TORCH_CHECK_VALUE(w.dim() == 4, "conv_weight_to_matrix: w must be 4-D [Cout, Cin, kh, kw], got ", w.dim(), "-D");
  return w.permute({0, 2, 3, 1}).reshape({w.size(0), -1});
}

at::Tensor matrix_to_conv_weight(const at::Tensor& mat, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(shape.size() == 4, "matrix_to_conv_weight: shape must have 4 entries, got ", shape.size());
  TORCH_CHECK_VALUE(mat.dim() == 2 && mat.size(0) == shape[0] && mat.size(1) == shape[1] * shape[2] * shape[3],
                    "matrix_to_conv_weight: mat must be [Cout, kh*kw*Cin] = [", shape[0], ", ",
                    shape[1] * shape[2] * shape[3], "], got ", mat.sizes());
  return mat.reshape({shape[0], shape[2], shape[3], shape[1]}).permute({0, 3, 1, 2}).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(prunedm, CompositeImplicitAutograd, m) {
  m.impl("conv_weight_to_matrix", &conv_weight_to_matrix);
  m.impl("matrix_to_conv_weight", &matrix_to_conv_weight);
}

// The module object of prunedm._C: importing it loads the library, whose static initialisers
// register the ops above. Its constants tell Python what was compiled in.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "prunedm's compiled ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef PRUNEDM_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  return module;
}
