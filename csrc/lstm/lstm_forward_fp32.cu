// fp32 instantiations of the LSTM forward launchers and residency queries (one small file per dtype: parallel builds).
#include "lstm/lstm_kernels.cuh"

namespace pyattn::lstm {
template cudaError_t launch_step_forward<float>(const StepForwardParams&, cudaStream_t);
template cudaError_t launch_persistent_forward<float>(const LayerForwardParams&, cudaStream_t, bool&);
template cudaError_t persistent_forward_residency<float>(int, int, int, PersistentResidency&);
template cudaError_t launch_projection_forward<float>(const ProjectionForwardParams&, cudaStream_t);
}  // namespace pyattn::lstm
