#!/bin/sh
# The comparisons docs/benchmarks.md quotes, through `mpi-imgproc compare` (one front door):
#   tiled: one large image through every method (the engines work across its tiles);
#   small: many small images (the engines work across images);
#   batch: JPEGs resized to 256x256 with files read and written inside the timing, against
#          `mpiexec -n N python -m mpi_imgproc.batch` and the server.
# Usage: sh benchmarks/compare.sh [OUT] [--quick]   (OUT defaults to bench-out/compare)
set -eu
out=${1:-bench-out/compare}
quick=${2:-}
if [ "$quick" = "--quick" ]; then
    large=3000 small=100 jpegs=300 repeat=2
else
    large=8000 small=500 jpegs=2000 repeat=3
fi
data="$out/data"
mkdir -p "$data"
mpi-imgproc gen-dataset "$data/tiled" --count 0 --large 1 --large-size "$large" --formats png
mpi-imgproc gen-dataset "$data/small" --count "$small" --min-size 300 --max-size 600 --formats png
mpi-imgproc gen-dataset "$data/batch" --count "$jpegs" --min-size 300 --max-size 600 --formats jpg
mpi-imgproc compare "$data/tiled" --op gaussian_blur:ksize=9 --ranks 2,3 --repeat "$repeat" \
    --out "$out/tiled"
mpi-imgproc compare "$data/small" --op gaussian_blur:ksize=9 --ranks 2,3 --repeat "$repeat" \
    --out "$out/small"
mpi-imgproc compare "$data/batch" --op resize:width=256,height=256,interpolation=lanczos \
    --ranks 3 --repeat "$repeat" --batch --methods sequential,threads,processes,pool \
    --out "$out/batch"
