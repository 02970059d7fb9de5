// fp16 head dim 128: the sm_80 forward launcher (one file per instantiation: parallel builds).
#include "attention/attention_launch_sm80.cuh"

namespace pyattn::attention {
template cudaError_t launch_attention_forward_sm80<Fp16, 128>(const ForwardParams&, cudaStream_t);
}  // namespace pyattn::attention
