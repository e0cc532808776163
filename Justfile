# Recipes for common tasks. `./dev just RECIPE` runs them inside the project's virtual environment.

# List the recipes.
default:
    @just --list

# Generate a small dataset, pack, train and evaluate it on the CPU.
demo dir="demo-output":
    ./dev demo {{dir}}

# Run the test suite.
test *args:
    ./dev test {{args}}

# ---------------------------------------------------------------------------------------------
# Docker: docker/Dockerfile builds a CUDA image whose entry point is `toolkit`. Override a
# setting below with `just NAME=VALUE RECIPE ...` or its environment variable, for example
# `just shm_size=32g docker-train data runs/a`.

# Image tag that docker-build writes and docker-train and docker-eval run.
image := env("TOOLKIT_IMAGE", "toolkit:latest")

# Shared memory of the container. DataLoader workers pass batches through /dev/shm, and Docker
# gives a container 64 MB of it by default.
shm_size := env("TOOLKIT_SHM_SIZE", "16g")

# GPUs the container sees, in the form `docker run --gpus` takes: all, a count, or device=ID.
gpus := env("TOOLKIT_GPUS", "all")

# Recipes run in the Justfile's folder, so each path argument is made absolute against the folder
# just was started from, with clean(join(caller_dir, PATH)), as `docker run --volume` needs. The
# recipes check that each input path exists first, because `--volume` creates a missing source as
# an empty folder owned by root.
# `--init` starts a small init process as PID 1 that passes Ctrl-C and `docker stop` on to
# toolkit and reaps exited DataLoader workers. `--network none` holds the rule that training and
# evaluation need no network, and `--user` makes the files in RUN belong to the caller.
# NOTE: just joins ARGS with spaces and the shell splits them again, so an argument that contains a
# space or a quote arrives in pieces. Put such values in a --config file.
caller_dir := invocation_directory()

# Build the image from docker/Dockerfile, passing ARGS to `docker build`.
docker-build *ARGS:
    docker build --file docker/Dockerfile --tag {{ quote(image) }} {{ ARGS }} .

# Train in the image on DATASET into RUN (created if missing), passing ARGS to `toolkit train`.
docker-train DATASET RUN *ARGS:
    @test -d {{ quote(clean(join(caller_dir, DATASET))) }} || { \
        echo "error: dataset directory not found: "{{ quote(clean(join(caller_dir, DATASET))) }}"; pass a folder written by toolkit pack" >&2; exit 1; }
    mkdir -p {{ quote(clean(join(caller_dir, RUN))) }}
    docker run --rm --init --network none --gpus {{ quote(gpus) }} --shm-size {{ quote(shm_size) }} \
        --user "$(id -u):$(id -g)" \
        --volume {{ quote(clean(join(caller_dir, DATASET))) }}:/data:ro \
        --volume {{ quote(clean(join(caller_dir, RUN))) }}:/run-dir \
        {{ quote(image) }} train /data /run-dir {{ ARGS }}

# Evaluate CHECKPOINT on DATASET in the image, both read-only, passing ARGS to `toolkit eval`.
docker-eval CHECKPOINT DATASET *ARGS:
    @test -f {{ quote(clean(join(caller_dir, CHECKPOINT))) }} || { \
        echo "error: checkpoint file not found: "{{ quote(clean(join(caller_dir, CHECKPOINT))) }}"; pass a .pt file from RUN/checkpoints" >&2; exit 1; }
    @test -d {{ quote(clean(join(caller_dir, DATASET))) }} || { \
        echo "error: dataset directory not found: "{{ quote(clean(join(caller_dir, DATASET))) }}"; pass a folder written by toolkit pack" >&2; exit 1; }
    docker run --rm --init --network none --gpus {{ quote(gpus) }} --shm-size {{ quote(shm_size) }} \
        --user "$(id -u):$(id -g)" \
        --volume {{ quote(clean(join(caller_dir, CHECKPOINT))) }}:/checkpoint.pt:ro \
        --volume {{ quote(clean(join(caller_dir, DATASET))) }}:/data:ro \
        {{ quote(image) }} eval /checkpoint.pt /data {{ ARGS }}

# ---------------------------------------------------------------------------------------------
# CJK character recognition from the installed fonts (docs/cjk.md). SET is gb2312-1 (3,755
# classes, recipe pipelines/cjk-3755.toml), gb2312-1-cpu (the same classes, sized for an hour on a
# CPU, pipelines/cjk-3755-cpu.toml) or uro (U+4E00..U+9FFF, pipelines/cjk-full.toml).

# Python of the project's virtual environment, which `./dev test` creates.
python := ".venv/bin/python"

# Render SET into DIR (images/, list.csv, classes.txt); ARGS go to pipelines/cjk/build.py.
cjk-build SET="gb2312-1" DIR=("cjk-" + SET) *ARGS:
    @test -x {{ quote(python) }} || { echo "error: {{ python }} not found; run ./dev test once to create the environment" >&2; exit 1; }
    {{ quote(python) }} -m pipelines.cjk.build --classes {{ quote(SET) }} --out {{ quote(clean(join(caller_dir, DIR))) }} {{ ARGS }}

# Build, pack, train and evaluate SET in DIR: DIR/dataset, DIR/run, DIR/report.json; ARGS go to the builder.
cjk SET="gb2312-1" DIR=("cjk-" + SET) *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    build=()
    case {{ quote(SET) }} in
        gb2312-1) classes=gb2312-1; recipe=pipelines/cjk-3755.toml ;;
        gb2312-1-cpu)
            # one image per training face, and only the Regular weights of the val fonts
            classes=gb2312-1; recipe=pipelines/cjk-3755-cpu.toml
            build=(--images-per-face 1 --val-family 'noto serif cjk' --exclude 'NotoSerifCJK[a-z]+_(?!Regular)'
                   --test-family 'ar pl sungtil + babelstone han' --test-family 'wenquanyi zen hei') ;;
        uro) classes=uro; recipe=pipelines/cjk-full.toml ;;
        *) echo "error: unknown CJK set {{ SET }}; use gb2312-1, gb2312-1-cpu or uro" >&2; exit 1 ;;
    esac
    dir={{ quote(clean(join(caller_dir, DIR))) }}
    test -x {{ quote(python) }} || { echo "error: {{ python }} not found; run ./dev test once to create the environment" >&2; exit 1; }
    {{ quote(python) }} -m pipelines.cjk.build --classes "$classes" --out "$dir" "${build[@]}" {{ ARGS }}
    ./dev toolkit pack "$dir/list.csv" "$dir/dataset" --classes "$dir/classes.txt" --config "$recipe"
    ./dev toolkit train "$dir/dataset" "$dir/run" --config "$recipe"
    ./dev toolkit eval "$dir/run/checkpoints/best.pt" "$dir/dataset" --config "$recipe" --report "$dir/report.json"
