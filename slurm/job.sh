# Sourced by the sbatch templates in this folder, never submitted itself. It loads the site's software, runs
# `main.py $ACTION` (or evaluation/evaluate.sh) on every task of the job with srun, and requeues the job when
# training stopped on SIGTERM/SIGUSR1 after saving its checkpoint, or sampling after its batch under way
# (main.py's exit status 75).
#
# Set by the template before sourcing: ACTION, DEFAULT_CONFIG, SITE_MODULES, SITE_CONDA_ENV.
# Arguments (those given to sbatch after the template): [config.json] [more main.py options, e.g. --set k=v]

set -uo pipefail  # no -e: a failing srun must still reach the requeue decision below

REQUEUE_STATUS=75  # guided_diffusion/distributed.py REQUEUE_EXIT_STATUS

cd "${SLURM_SUBMIT_DIR:-.}" || exit 1
if [ ! -f main.py ]; then
    echo "job.sh: error: no main.py in $(pwd); submit with sbatch from the repository root" >&2
    exit 2
fi

if [ -n "${SITE_MODULES}" ]; then
    # shellcheck disable=SC2086  # a space-separated list of modules
    module load ${SITE_MODULES} || { echo "job.sh: error: module load ${SITE_MODULES} failed" >&2; exit 2; }
fi
if [ -n "${SITE_CONDA_ENV}" ]; then
    if ! command -v conda >/dev/null 2>&1; then
        echo "job.sh: error: SITE_CONDA_ENV=${SITE_CONDA_ENV} but conda is not on PATH (load it in SITE_MODULES)" >&2
        exit 2
    fi
    eval "$(conda shell.bash hook)" && conda activate "${SITE_CONDA_ENV}" || exit 2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
PYTHON="${PYTHON:-python3}"

echo "job.sh: $(date '+%F %T') job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}:" \
     "${ACTION} on ${SLURM_JOB_NUM_NODES:-1} node(s) [${SLURM_JOB_NODELIST:-localhost}]," \
     "${SLURM_NTASKS:-1} task(s), ${OMP_NUM_THREADS} CPU thread(s) per task"

if [ "${ACTION}" = evaluate ]; then
    command=(bash evaluation/evaluate.sh "$@")
else
    config="${1:-${DEFAULT_CONFIG}}"
    [ "$#" -gt 0 ] && shift
    command=("${PYTHON}" main.py "${ACTION}" -c "${config}")
    if [ "${ACTION}" = train ] || [ "${ACTION}" = finetune ] || [ "${ACTION}" = sample ]; then
        # a requeued job continues: training from the newest latest.pt of root_log_dir, sampling in the newest
        # sample run folder there, keeping the images it wrote
        command+=(--set auto_resume=true)
    fi
    command+=("$@")
fi

# srun runs in the background so that a SIGTERM to this shell (preemption) only interrupts `wait`: the shell
# stays until the tasks have saved their checkpoint and exited.
trap 'echo "job.sh: $(date +%T) SIGTERM: waiting for the tasks to save their checkpoint" >&2' TERM
srun --kill-on-bad-exit=1 "${command[@]}" &
launcher=$!
while true; do
    wait "${launcher}" && status=0 || status=$?
    kill -0 "${launcher}" 2>/dev/null || break  # `wait` returned because srun ended, not because of a signal
done
trap - TERM

if [ "${status}" -eq "${REQUEUE_STATUS}" ]; then
    echo "job.sh: $(date +%T) ${ACTION} stopped on a signal with its work saved; requeueing job ${SLURM_JOB_ID:-?}"
    # After a preemption Slurm requeues the job itself and this may report that it is already being requeued.
    scontrol requeue "${SLURM_JOB_ID}" || true
    exit 0
fi
echo "job.sh: $(date +%T) ${ACTION} finished with status ${status}"
exit "${status}"
