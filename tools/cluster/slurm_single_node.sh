#!/usr/bin/env bash
# A real Slurm job array of `l2s eval --shard auto` on a one-node cluster, checked against a
# one-process run of the same evaluation.
#
# Installs Slurm and MUNGE from Debian's packages (needs root and apt), writes a one-node
# configuration (slurmctld and slurmd on this machine, no cgroups, no accounting), starts the
# daemons, submits a 3-task array of `l2s eval --shard auto` on the built-in shapes model, all
# tasks writing into one folder as on shared storage, waits for it, scores both folders and
# checks that the array's folder equals the one-process run file by file (images byte for byte).
# The daemons are stopped at the end; the work folder is kept and printed.
#
#   tools/cluster/slurm_single_node.sh [path/to/l2s] [work-folder]
#
# Defaults: target/release/l2s and a new folder under /tmp.
set -euo pipefail

L2S=$(realpath "${1:-target/release/l2s}")
WORK=${2:-$(mktemp -d /tmp/l2s-slurm.XXXXXX)}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
[ -x "$L2S" ] || { echo "no l2s binary at $L2S (cargo build --release first)" >&2; exit 1; }
EVAL=(eval --generate-prompts 6 --images-per-prompt 1 --steps 10 -q)

say() { printf '\n== %s\n' "$*"; }

say "installing slurm-wlm and munge"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
slurmctld -V

say "starting munge"
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
pgrep -u munge munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge | grep STATUS

say "configuring a one-node cluster"
HOST=$(hostname -s)
CPUS=$(nproc)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >/etc/slurm/slurm.conf <<EOF
ClusterName=l2s
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
cat /etc/slurm/slurm.conf

say "starting slurmctld and slurmd"
stop() {
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
}
trap stop EXIT
slurmctld
slurmd
for _ in $(seq 60); do
    sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break
    sleep 1
done
sinfo

say "one-process reference run"
"$L2S" "${EVAL[@]}" --out "$WORK/reference"

say "a 3-task job array into one folder (as on shared storage)"
cat >"$WORK/eval-array.sbatch" <<EOF
#!/bin/bash
#SBATCH --job-name=l2s-eval
#SBATCH --array=0-2
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --output=$WORK/logs/eval-%A_%a.out
echo "task \$SLURM_ARRAY_TASK_ID of \$SLURM_ARRAY_TASK_COUNT (ids \$SLURM_ARRAY_TASK_MIN-\$SLURM_ARRAY_TASK_MAX) on \$(hostname)"
exec "$L2S" ${EVAL[*]} --workers 1 --shard auto --out "$WORK/array"
EOF
mkdir -p "$WORK/logs"
cat "$WORK/eval-array.sbatch"
sbatch --wait "$WORK/eval-array.sbatch"
for f in "$WORK"/logs/eval-*.out; do echo "--- $(basename "$f")"; cat "$f"; done
sacct >/dev/null 2>&1 || true

say "scoring both folders"
"$L2S" score "$WORK/reference" -q >/dev/null
"$L2S" score "$WORK/array" -q >/dev/null

say "comparing the array's folder with the one-process run"
(cd "$WORK/reference" && find . -type f | sort) >"$WORK/reference.files"
(cd "$WORK/array" && find . -type f | sort) >"$WORK/array.files"
diff "$WORK/reference.files" "$WORK/array.files"
echo "$(wc -l <"$WORK/reference.files") files in each"
status=0
while read -r f; do
    if [ "$f" = ./summary.json ]; then
        # The summary names the folder it scored ("source"); everything else must agree.
        cmp -s <(sed "s#$WORK/reference#DIR#" "$WORK/reference/$f") \
            <(sed "s#$WORK/array#DIR#" "$WORK/array/$f") || { echo "differs: $f"; status=1; }
    else
        cmp -s "$WORK/reference/$f" "$WORK/array/$f" || { echo "differs: $f"; status=1; }
    fi
done <"$WORK/reference.files"
[ $status -eq 0 ] || exit 1
echo "identical: every file, images byte for byte, results.jsonl too; summary.json but for the folder it names"
grep -E '"(images|position_accuracy)"' "$WORK/array/summary.json"
echo "work folder: $WORK"
