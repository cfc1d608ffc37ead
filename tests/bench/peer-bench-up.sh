#!/bin/bash
# INTERPOSE_BIN for ../shared/peer-bench/run.sh: runs `interpose up` and drops the trailing
# ` token=PATH` of its ready line, because peer-bench reads `ca=` up to the end of the line
# (its contract predates the token). Everything else passes through unchanged, and the
# process peer-bench stops by PID is `interpose` itself (exec).
#   INTERPOSE_BIN=$PWD/tests/bench/peer-bench-up.sh ../shared/peer-bench/run.sh --only interpose
# The binary is target/release/interpose next to this script, or $UP_BIN.
here=$(cd "$(dirname "$0")/../.." && pwd)
exec "${UP_BIN:-$here/target/release/interpose}" "$@" > >(sed -u 's/ token=[^ ]*$//')
