// fp32 instantiations of the LSTM backward launchers and residency queries (one small file per dtype: parallel builds).
#include "lstm/lstm_kernels.cuh"

namespace pyattn::lstm {
template cudaError_t launch_step_backward<float>(const LayerBackwardParams&, int, cudaStream_t);
template cudaError_t launch_persistent_backward<float>(const LayerBackwardParams&, cudaStream_t, bool&);
template cudaError_t persistent_backward_residency<float>(int, int, int, PersistentResidency&);
template cudaError_t launch_cell_backward<float>(const CellBackwardParams&, cudaStream_t);
}  // namespace pyattn::lstm
