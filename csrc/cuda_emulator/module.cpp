// ddpm_fast._cuda_emulator: the CUDA launchers of csrc/cuda compiled for the host and run by the emulator
// (emulator.h) on CPU memory, with the emulator's controls. Pointers are CPU tensors' data pointers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "../cuda/bind.h"
#include "emulator.h"

namespace py = pybind11;
namespace emu = ddpm_fast::emulator;

namespace ddpm_fast::emulator {
std::vector<float> selftest(const std::string& name);  // selftest.cpp
}

PYBIND11_MODULE(_cuda_emulator, m) {
  m.doc() = "ddpm_fast's CUDA kernels run on the CPU by an emulator of CUDA's execution model (tests only)";
  ddpm_fast::bind::def_cuda(m);
  m.def("set_device", &emu::set_device, py::arg("device"),
        "The calling thread's emulated device: 0 an H200 (sm_90, clusters), 1 an A100 (sm_80), 2 an L4 "
        "(sm_89, 99 KB of shared memory a block)");
  m.def("set_schedule", &emu::set_schedule, py::arg("order"), py::arg("seed") = 0,
        "The order in which threads run between barriers: 0 forward, 1 reverse, 2 random (seeded)");
  m.def("get_schedule", &emu::get_schedule, "The (order, seed) set_schedule set last");
  m.def("take_stats", [] {
    const emu::LaunchStats s = emu::take_stats();
    py::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["max_cluster"] = s.max_cluster;
    return d;
  }, "This thread's launches since the last call: their number, blocks, and the largest cluster");
  m.def("selftest", &emu::selftest, py::arg("name"),
        "Runs one of the emulator's small faulty kernels (selftest.cpp) on 64 floats and returns them");
}
