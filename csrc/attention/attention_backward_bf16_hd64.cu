// bf16 head dim 64: the sm_80 backward launcher (one file per instantiation: parallel builds).
#include "attention/attention_launch_sm80.cuh"

namespace pyattn::attention {
template cudaError_t launch_attention_backward_sm80<Bf16, 64>(const BackwardParams&, cudaStream_t);
}  // namespace pyattn::attention
