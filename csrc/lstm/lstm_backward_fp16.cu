// fp16 instantiations of the LSTM backward launchers and residency queries (one small file per dtype: parallel builds).
#include "lstm/lstm_kernels.cuh"

namespace pyattn::lstm {
template cudaError_t launch_step_backward<__half>(const LayerBackwardParams&, int, cudaStream_t);
template cudaError_t launch_persistent_backward<__half>(const LayerBackwardParams&, cudaStream_t, bool&);
template cudaError_t persistent_backward_residency<__half>(int, int, int, PersistentResidency&);
template cudaError_t launch_cell_backward<__half>(const CellBackwardParams&, cudaStream_t);
}  // namespace pyattn::lstm
