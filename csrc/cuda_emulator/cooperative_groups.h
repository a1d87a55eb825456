// The emulator's stand-in for the toolkit's cooperative_groups.h (emulator.h): the thread-block cluster
// calls the kernels make.
#pragma once

#include "emulator.h"

namespace cooperative_groups {

struct cluster_group {
  void sync() const { ::ddpm_fast::emulator::sync_cluster(); }
  unsigned block_rank() const { return ::ddpm_fast::emulator::cluster_rank(); }
  template <class T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return static_cast<T*>(::ddpm_fast::emulator::cluster_shared(p, rank));
  }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
