"""CMakeLists.txt's build switches, configured for real (no compile): a value it cannot read stops the build
with its name, instead of being read as another (DDPM_FAST_CUDA=0 used to build the CUDA kernels as AUTO)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None,
                                reason="needs cmake and ninja on PATH")


def _configure(tmp_path, *defines: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``cmake`` configuring the project in ``tmp_path`` with ``defines``, in ``env`` (default: this one's)."""
    import pybind11
    return subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(tmp_path / "build"), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}",
         f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DSKBUILD_PROJECT_VERSION=0.0.0", *defines],
        capture_output=True, text=True, env=os.environ if env is None else env)


@pytest.mark.parametrize("value", ["0", "false", "No", "off"])
def test_cuda_switch_takes_cmake_s_booleans(tmp_path, value):
    done = _configure(tmp_path, f"-DDDPM_FAST_CUDA={value}", "-DDDPM_FAST_CUDA_EMULATOR=OFF")
    assert done.returncode == 0, done.stderr
    assert "ddpm_fast: CPU only (built with DDPM_FAST_CUDA=OFF)" in done.stdout


@pytest.mark.parametrize("define, message", [
    ("-DDDPM_FAST_CUDA=maybe", "DDPM_FAST_CUDA must be AUTO, ON or OFF, got 'maybe'"),
    ("-DDDPM_FAST_CUDA_EMULATOR=sometimes", "DDPM_FAST_CUDA_EMULATOR must be AUTO, ON or OFF, got 'sometimes'"),
    ("-DDDPM_FAST_CUDA_ARCHS=8.0;9.0", "DDPM_FAST_CUDA_ARCHS: '8.0' is not an architecture"),
    ("-DDDPM_FAST_CUDA_ARCHS=sm_90", "DDPM_FAST_CUDA_ARCHS: 'sm_90' is not an architecture"),
])
def test_a_value_it_cannot_read_stops_the_build_naming_it(tmp_path, define, message):
    done = _configure(tmp_path, define)
    assert done.returncode != 0
    assert message in " ".join(done.stderr.split()), done.stderr


ARCH_VARIABLES = ("DDPM_FAST_CUDA_ARCHS", "CUDAARCHS", "TORCH_CUDA_ARCH_LIST")
DEFAULT_ARCHS = "80-real;86-real;89-real;90-real;90-virtual"


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="needs nvcc")
@pytest.mark.parametrize("given, built", [
    # (environment variables and -D, what is built and from where): the first given in this order wins.
    ({"DDPM_FAST_CUDA_ARCHS": "86-real", "-DCMAKE_CUDA_ARCHITECTURES": "75-real", "TORCH_CUDA_ARCH_LIST": "9.0"},
     "86-real (from DDPM_FAST_CUDA_ARCHS)"),
    ({"-DDDPM_FAST_CUDA_ARCHS": "89-real", "CUDAARCHS": "75-real"}, "89-real (from DDPM_FAST_CUDA_ARCHS)"),
    ({"-DCMAKE_CUDA_ARCHITECTURES": "90a-real", "CUDAARCHS": "75-real"}, "90a-real (from CMAKE_CUDA_ARCHITECTURES)"),
    ({"CUDAARCHS": "75-real", "TORCH_CUDA_ARCH_LIST": "9.0"}, "75-real (from CUDAARCHS)"),
    ({"TORCH_CUDA_ARCH_LIST": "7.5 8.0;9.0a+PTX"}, "75-real,80-real,90a-real,90a-virtual (from TORCH_CUDA_ARCH_LIST)"),
    ({"TORCH_CUDA_ARCH_LIST": "Ampere;Hopper"},  # PyTorch's names
     "80-real,86-real,86-virtual,90-real,90-virtual (from TORCH_CUDA_ARCH_LIST)"),
    ({}, "80-real,86-real,89-real,90-real,90-virtual (from the default)"),
])
def test_the_architectures_come_from_the_first_variable_given(tmp_path, given, built):
    """DDPM_FAST_CUDA_ARCHS, then the ways CMake and PyTorch name architectures (a wheel build scripted for
    another extension sets those); pyproject.toml always passes the default DDPM_FAST_CUDA_ARCHS, as here."""
    env = {k: v for k, v in os.environ.items() if k not in ARCH_VARIABLES}
    env.update({k: v for k, v in given.items() if not k.startswith("-D")})
    defines = [f"{k}={v}" for k, v in given.items() if k.startswith("-D")]
    if "-DDDPM_FAST_CUDA_ARCHS" not in given:  # pyproject.toml's define: the variable, else the default
        defines.append(f"-DDDPM_FAST_CUDA_ARCHS={given.get('DDPM_FAST_CUDA_ARCHS', DEFAULT_ARCHS)}")
    done = _configure(tmp_path, "-DDDPM_FAST_CUDA=ON", "-DDDPM_FAST_CUDA_EMULATOR=OFF", *defines, env=env)
    assert done.returncode == 0, done.stderr
    assert f"kernels for architectures {built}\n" in done.stdout


def test_a_torch_arch_list_it_cannot_read_stops_a_cuda_build_naming_it(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k not in ARCH_VARIABLES}, "TORCH_CUDA_ARCH_LIST": "8.0;Blackwell"}
    done = _configure(tmp_path, env=env)
    assert done.returncode != 0
    assert "TORCH_CUDA_ARCH_LIST: 'Blackwell' is not an architecture" in " ".join(done.stderr.split()), done.stderr
    # A CPU-only build does not read it (the variable may be set for other extensions' builds).
    done = _configure(tmp_path, "-DDDPM_FAST_CUDA=OFF", "-DDDPM_FAST_CUDA_EMULATOR=OFF", env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="needs nvcc")
def test_a_build_folder_configured_again_takes_the_new_cudaarchs(tmp_path):
    """CMake caches CUDAARCHS as CMAKE_CUDA_ARCHITECTURES; the next configure of the folder (pip reuses
    build/{wheel_tag}) must not take that for a -D of the user's."""
    env = {k: v for k, v in os.environ.items() if k not in ARCH_VARIABLES}
    for archs in ("75-real", "90-real", None):
        given = {"CUDAARCHS": archs} if archs else {}
        done = _configure(tmp_path, "-DDDPM_FAST_CUDA=ON", "-DDDPM_FAST_CUDA_EMULATOR=OFF",
                          f"-DDDPM_FAST_CUDA_ARCHS={DEFAULT_ARCHS}", env={**env, **given})
        assert done.returncode == 0, done.stderr
        built = f"{archs} (from CUDAARCHS)" if archs else f"{DEFAULT_ARCHS.replace(';', ',')} (from the default)"
        assert f"kernels for architectures {built}\n" in done.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="needs nvcc")
def test_noise_and_step_kernels_compile_without_fma_contraction(tmp_path):
    """nvcc may fuse one expression differently in two kernels; the tests demand that the noise and the step agree
    bit for bit across their layouts' walks, so those sources (only) are compiled with --fmad=false."""
    done = _configure(tmp_path, "-DDDPM_FAST_CUDA=ON", "-DDDPM_FAST_CUDA_EMULATOR=OFF",
                      "-DDDPM_FAST_CUDA_ARCHS=90-real")
    assert done.returncode == 0, done.stderr
    rules = {rule.split(":")[0]: rule for rule in (tmp_path / "build" / "build.ninja").read_text().split("\nbuild ")}
    sources = ("q_sample", "step", "normal", "group_norm_forward", "group_norm_backward", "runtime")
    compiled = {name: rules[f"CMakeFiles/_C.dir/csrc/cuda/{name}.cu.o"] for name in sources}
    assert {name for name, rule in compiled.items() if "--fmad=false" in rule} == {"q_sample", "step", "normal"}
