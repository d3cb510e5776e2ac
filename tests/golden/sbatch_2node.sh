#!/bin/bash

# Parameters
#SBATCH --account=hawq-proj
#SBATCH --constraint='a100&ib'
#SBATCH --cpus-per-task=8
#SBATCH --error={FOLDER}/%j_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=1
#SBATCH --hold
#SBATCH --job-name=hawq
#SBATCH --mail-type=END
#SBATCH --mem=7680MB
#SBATCH --no-requeue
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output={FOLDER}/%j_0_log.out
#SBATCH --qos=high
#SBATCH --signal=USR2@120
#SBATCH --time=240
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output {FOLDER}/%j_%t_log.out --error {FOLDER}/%j_%t_log.err {PYTHON} -u -m submitit.core._submit {FOLDER}
