#pragma once
#include "emu_core.h"
namespace cooperative_groups {
struct grid_group { void sync() { emu::grid_barrier->arrive_and_wait(); } };
inline grid_group this_grid() { return {}; }
}
