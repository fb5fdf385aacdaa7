# Sourced by the bench scripts that use llama.cpp (bench/gguf_llama_cpp.sh,
# bench/generate.sh, bench/chat_lora_peers.sh): one venv, bench/.work/venv-llama-cpp,
# with llama-cpp-python built from source (llama.cpp is compiled when it installs: about
# 20 minutes on 2 cores, once per venv) and gguf-py, at the versions below, so that
# every script shares one build.
#
# Knobs: LLAMA_CPP_PYTHON_VERSION, GGUF_VERSION (defaults below), PYTHON (the
# interpreter that makes the venv).

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
GGUF_VERSION="${GGUF_VERSION:-0.19.0}"
LLAMA_CPP_VENV="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/.work/venv-llama-cpp"

# llama_cpp_venv_ready VENV: whether VENV holds these versions of llama-cpp-python and gguf.
llama_cpp_venv_ready() {
    [[ -x "$1/bin/python" ]] && "$1/bin/python" -c "
import llama_cpp, importlib.metadata as m
assert llama_cpp.__version__ == '$LLAMA_CPP_PYTHON_VERSION'
assert m.version('gguf') == '$GGUF_VERSION'" 2>/dev/null
}

# install_llama_cpp_venv VENV [PIP_ARGS...]: makes VENV and installs them into it,
# building llama.cpp from source.
install_llama_cpp_venv() {
    local venv="$1"
    shift
    "${PYTHON:-python3}" -m venv "$venv"
    # Only the library: no multimodal tools, tests, examples or OpenMP runtime.
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \
        "$venv/bin/pip" install --disable-pip-version-check "$@" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" "gguf==$GGUF_VERSION" numpy
}

# ensure_llama_cpp_venv [VENV]: installs (quietly) unless VENV (default $LLAMA_CPP_VENV)
# is ready; its interpreter is then VENV/bin/python.
ensure_llama_cpp_venv() {
    local venv="${1:-$LLAMA_CPP_VENV}"
    llama_cpp_venv_ready "$venv" && return 0
    printf '>> %s\n' "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (builds llama.cpp) and gguf==$GGUF_VERSION into $venv" >&2
    install_llama_cpp_venv "$venv" --quiet
}
