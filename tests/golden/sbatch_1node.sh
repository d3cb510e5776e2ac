#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=2
#SBATCH --error={FOLDER}/%j_0_log.err
#SBATCH --job-name=hawq-quickstart
#SBATCH --mem=4GB
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output={FOLDER}/%j_0_log.out
#SBATCH --partition=debug
#SBATCH --requeue
#SBATCH --signal=USR2@90
#SBATCH --time=30
#SBATCH --wckey=submitit

# setup
source .venv/bin/activate
export RAY_AUTH_MODE=disabled

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output {FOLDER}/%j_%t_log.out --error {FOLDER}/%j_%t_log.err {PYTHON} -u -m submitit.core._submit {FOLDER}
