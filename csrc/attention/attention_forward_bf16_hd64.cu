// bf16 head dim 64: the sm_80 forward launcher (one file per instantiation: parallel builds).
#include "attention/attention_launch_sm80.cuh"

namespace pyattn::attention {
template cudaError_t launch_attention_forward_sm80<Bf16, 64>(const ForwardParams&, cudaStream_t);
}  // namespace pyattn::attention
