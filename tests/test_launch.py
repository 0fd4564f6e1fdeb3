"""The launch scripts (launch/): the commands they print with --dry-run, that --dry-run runs
nothing, that a real run runs exactly the printed commands, and their errors for missing flags.

gcloud, sbatch, srun, tar, mkdir and scontrol are replaced by stubs that record their arguments;
the dry-run tests put only the stubs on PATH (so the scripts may use nothing but bash builtins).
"""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT

BASH = shutil.which('bash')
TPU = os.path.join(ROOT, 'launch', 'tpu_vm.sh')
SLURM = os.path.join(ROOT, 'launch', 'gpu_slurm.sh')
SBATCH_SCRIPT = os.path.join(ROOT, 'launch', 'gpu_slurm.sbatch')

LOCATION = ['--project=my-proj', '--zone=us-central2-b', '--name=segvit-pod']
GCLOUD_LOCATION = ['--project=my-proj', '--zone=us-central2-b']
RUN_ARGS = ['--config=configs/synthetic.py', '--workdir=gs://b/w']
SLURM_ENV = {'SLURM_JOB_NODELIST': 'gpu[07-08]', 'SLURM_NNODES': '2', 'SLURM_JOB_ID': '4242'}

# Records its name and arguments as one JSON line in $STUB_LOG. `gcloud ... describe --format=...`
# prints the next state of $STUB_STATES (comma separated, the last one repeats); scontrol prints
# the hosts of $STUB_HOSTS.
_STUB = r'''#!{python}
import json, os, sys
name = os.path.basename(sys.argv[0])
with open(os.environ['STUB_LOG'], 'a') as f:
  f.write(json.dumps([name] + sys.argv[1:]) + '\n')
if name == 'gcloud' and 'describe' in sys.argv and any(a.startswith('--format') for a in sys.argv):
  states = os.environ['STUB_STATES'].split(',')
  counter = os.environ['STUB_LOG'] + '.polls'
  polls = int(open(counter).read()) if os.path.exists(counter) else 0
  open(counter, 'w').write(str(polls + 1))
  print(states[min(polls, len(states) - 1)])
if name == 'scontrol':
  print('\n'.join(os.environ['STUB_HOSTS'].split()))
'''
_STUBBED = ('gcloud', 'sbatch', 'srun', 'tar', 'mkdir', 'scontrol', 'fake_python')


@pytest.fixture
def env(tmp_path):
  """Runs a launch script with stubs first on PATH; .calls() gives the recorded invocations."""
  stub_dir = tmp_path / 'bin'
  stub_dir.mkdir()
  for name in _STUBBED:
    path = stub_dir / name
    path.write_text(_STUB.replace('{python}', sys.executable))
    path.chmod(0o755)
  log = tmp_path / 'calls.jsonl'

  class Env:
    stubs = str(stub_dir)
    tmp = tmp_path

    def run(self, script, *args, real_path=False, extra_env=None, cwd=ROOT):
      # Dry runs see only the stubs: any other program the script needed would fail.
      path = self.stubs + (':/usr/bin:/bin' if real_path else '')
      environ = {'PATH': path, 'STUB_LOG': str(log), 'STUB_STATES': 'ACTIVE',
                 'STUB_HOSTS': 'gpu07 gpu08', 'TMPDIR': str(tmp_path), 'HOME': str(tmp_path)}
      environ.update(extra_env or {})
      return subprocess.run([BASH, script, *args], capture_output=True, text=True, env=environ,
                            cwd=cwd, timeout=60, check=False)

    def calls(self, include_queries=False):
      if not log.exists():
        return []
      calls = [json.loads(line) for line in log.read_text().splitlines()]
      return [c for c in calls if include_queries or c[0] != 'scontrol']

  return Env()


def commands(stdout):
  """The printed commands as argument lists (comment lines skipped)."""
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith('#')]


def dry_run(env, script, *args, extra_env=None):
  before = env.calls()
  result = env.run(script, *args, '--dry-run', extra_env=extra_env)
  assert result.returncode == 0, result.stderr
  assert env.calls() == before, 'a --dry-run executed a command'
  return commands(result.stdout)


def remote_script(ssh_cmd):
  """The --command= value of a `gcloud compute tpus tpu-vm ssh` command."""
  values = [a[len('--command='):] for a in ssh_cmd if a.startswith('--command=')]
  assert len(values) == 1, ssh_cmd
  return values[0]


def remote_command(ssh_cmd):
  """The --command= value split into words as a shell would."""
  return shlex.split(remote_script(ssh_cmd))


def _alive(pid):
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def _wait_for(predicate, seconds=10.0):
  deadline = time.monotonic() + seconds
  while not predicate():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


# ----------------------------------------------------------------------------------- TPU VM


@pytest.mark.parametrize('accelerator,runtime', [
    ('v4-32', 'tpu-ubuntu2204-base'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-32', 'v2-alpha-tpuv5'),
    ('v6e-16', 'v2-alpha-tpuv6e'),
])
def test_tpu_create_requests_queued_resource_and_polls(env, accelerator, runtime):
  cmds = dry_run(env, TPU, 'create', *LOCATION, f'--accelerator_type={accelerator}')
  assert cmds == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'segvit-pod',
       '--node-id=segvit-pod', *GCLOUD_LOCATION, f'--accelerator-type={accelerator}',
       f'--runtime-version={runtime}'],
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'segvit-pod',
       *GCLOUD_LOCATION, '--format=value(state.state)'],
  ]


def test_tpu_create_spot_and_explicit_runtime_version(env):
  # Space-separated flag values work too.
  cmds = dry_run(env, TPU, 'create', '--project', 'p2', '--zone', 'europe-west4-a', '--name', 'n2',
                 '--accelerator_type', 'v5litepod-16', '--runtime_version', 'my-runtime', '--spot')
  assert cmds[0] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'n2',
                     '--node-id=n2', '--project=p2', '--zone=europe-west4-a',
                     '--accelerator-type=v5litepod-16', '--runtime-version=my-runtime', '--spot']


def test_tpu_create_unknown_accelerator_needs_runtime_version(env):
  result = env.run(TPU, 'create', *LOCATION, '--accelerator_type=v99-8', '--dry-run')
  assert result.returncode == 2
  assert '--runtime_version' in result.stderr and 'v99-8' in result.stderr


def test_tpu_setup_copies_code_and_installs_pinned_requirements(env):
  tar, scp, ssh = dry_run(env, TPU, 'setup', *LOCATION)
  archive = os.path.join(str(env.tmp), 'segvit_jax_code_segvit-pod.tar.gz')
  assert tar[:5] == ['tar', '-czf', archive, '-C', ROOT]
  assert tar[-4:] == ['segvit_jax', 'configs', 'requirements.txt', 'requirements-tpu.txt']
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', archive,
                 'segvit-pod:segvit_jax_code.tar.gz', *GCLOUD_LOCATION, '--worker=all']
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'segvit-pod']
  assert '--worker=all' in ssh and all(flag in ssh for flag in GCLOUD_LOCATION)
  remote = ' '.join(remote_command(ssh))
  assert 'tar -xzf segvit_jax_code.tar.gz -C segvit_jax' in remote
  assert 'python3.11 -m venv .venv' in remote
  # jax, jaxlib from requirements.txt; libtpu (jax's [tpu] extra) from requirements-tpu.txt.
  assert '.venv/bin/pip install -q -r requirements.txt -r requirements-tpu.txt' in remote
  assert 'jax[tpu]' not in remote


def test_tpu_setup_puts_pretrained_backbones_on_every_worker(env):
  local = env.tmp / 'L_16-i21k.npz'
  local.write_bytes(b'weights')
  tar, scp, ssh, scp_local = dry_run(env, TPU, 'setup', *LOCATION, f'--pretrained={local}',
                                     '--pretrained', 'gs://bucket/vit/B_16 i21k.npz')
  assert tar[0] == 'tar' and scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  # The local file goes from here to every worker, after setup made the folder ...
  assert scp_local == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', str(local),
                       'segvit-pod:segvit_jax/pretrained/L_16-i21k.npz', *GCLOUD_LOCATION,
                       '--worker=all']
  remote = remote_command(ssh)
  assert remote[:3] == ['mkdir', '-p', 'segvit_jax/pretrained']
  # ... the gs:// file is fetched by each worker, into the same folder (cwd: segvit_jax).
  copy = remote.index('storage') - 1
  assert remote[copy:copy + 5] == ['gcloud', 'storage', 'cp', 'gs://bucket/vit/B_16 i21k.npz',
                                   'pretrained/B_16 i21k.npz']
  result = env.run(TPU, 'setup', *LOCATION, f'--pretrained={local}', '--dry-run')
  assert '--config.pretrained_backbone=pretrained/L_16-i21k.npz' in result.stderr


def test_tpu_run_starts_main_on_all_workers_with_overrides(env):
  tricky = "--config.name=it's (a, b)"  # a space, a quote and parentheses survive both shells
  [ssh] = dry_run(env, TPU, 'run', *LOCATION, '--config=configs/synthetic.py',
                  '--workdir=gs://bucket/runs/x', '--data_dir=gs://bucket/tfds',
                  '--config.batch_size=64', tricky)
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'segvit-pod']
  assert '--worker=all' in ssh
  remote = remote_command(ssh)
  start, end = remote.index('nohup') + 1, remote.index('>>')
  assert remote[start:end] == [
      '.venv/bin/python', '-m', 'segvit_jax.main', '--config=configs/synthetic.py',
      '--workdir=gs://bucket/runs/x', '--config.dataset.data_dir=gs://bucket/tfds',
      '--config.batch_size=64', tricky]
  # One log per worker (named by the worker's host), the pid kept for `stop`, all in the background.
  assert remote[end + 1] == 'logs/main-$(hostname).log'
  assert remote[remote.index('<') + 1:remote.index('<') + 4] == ['/dev/null', '&', 'echo']
  assert remote[:2] == ['cd', 'segvit_jax']


@pytest.mark.parametrize('command', ['setup', 'run', 'logs', 'stop'])
def test_tpu_remote_scripts_are_valid_bash(env, command):
  """What setup/run/logs/stop send to the workers parses (bash -n: syntax only)."""
  args = {'run': RUN_ARGS + ["--config.name=it's"],
          'setup': ["--pretrained=gs://b/it's.npz"]}.get(command, [])
  ssh = next(c for c in dry_run(env, TPU, command, *LOCATION, *args) if 'ssh' in c)
  result = subprocess.run([BASH, '-n', '-c', remote_script(ssh)], capture_output=True, text=True,
                          timeout=30, check=False)
  assert result.returncode == 0, result.stderr


def test_tpu_remote_run_and_stop_on_a_fake_worker(env):
  """The run/stop scripts executed in a fake worker home: main starts in the background with its
  flags, logs to logs/main-HOST.log, refuses a second start while running, and stop ends it."""
  [run_ssh] = dry_run(env, TPU, 'run', *LOCATION, *RUN_ARGS, '--config.name=a b')
  [stop_ssh] = dry_run(env, TPU, 'stop', *LOCATION)
  home = env.tmp / 'worker_home'
  venv_bin = home / 'segvit_jax' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  fake_python = venv_bin / 'python'
  fake_python.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > args.txt\nexec sleep 60\n')
  fake_python.chmod(0o755)
  worker = dict(cwd=home, env={'PATH': '/usr/bin:/bin', 'HOME': str(home)}, capture_output=True,
                text=True, timeout=30, check=False)
  pid_file = home / 'segvit_jax' / 'logs' / 'main.pid'
  args_file = home / 'segvit_jax' / 'args.txt'
  pid = None
  try:
    result = subprocess.run([BASH, '-c', remote_script(run_ssh)], **worker)
    assert result.returncode == 0, result.stderr
    assert _wait_for(args_file.exists)
    pid = int(pid_file.read_text())
    assert _wait_for(lambda: args_file.read_text().count('\n') == 5)
    assert args_file.read_text().splitlines() == [
        '-m', 'segvit_jax.main', *RUN_ARGS, '--config.name=a b']
    assert (home / 'segvit_jax' / 'logs' / f'main-{socket.gethostname()}.log').exists()
    assert _alive(pid)

    result = subprocess.run([BASH, '-c', remote_script(run_ssh)], **worker)
    assert result.returncode == 1 and 'already running' in result.stderr

    result = subprocess.run([BASH, '-c', remote_script(stop_ssh)], **worker)
    assert result.returncode == 0, result.stderr
    assert _wait_for(lambda: not _alive(pid))
  finally:
    if pid is not None and _alive(pid):
      os.kill(pid, signal.SIGKILL)


def test_tpu_run_without_data_dir_passes_no_data_dir(env):
  [ssh] = dry_run(env, TPU, 'run', *LOCATION, '--config=configs/synthetic.py',
                  '--workdir=gs://b/w')
  assert not any('data_dir' in a for a in remote_command(ssh))


@pytest.mark.parametrize('worker', [None, '3'])
def test_tpu_logs_follows_one_worker(env, worker):
  args = [] if worker is None else [f'--worker={worker}']
  [ssh] = dry_run(env, TPU, 'logs', *LOCATION, *args)
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'segvit-pod']
  assert f'--worker={worker or 0}' in ssh
  assert remote_command(ssh) == ['tail', '-n', '200', '-F', 'segvit_jax/logs/main-$(hostname).log']


def test_tpu_stop_and_delete_and_status(env):
  [stop] = dry_run(env, TPU, 'stop', *LOCATION)
  assert '--worker=all' in stop and 'kill' in remote_command(stop)
  [delete] = dry_run(env, TPU, 'delete', *LOCATION, '--accelerator_type=v4-32')
  assert delete == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'segvit-pod',
                    *GCLOUD_LOCATION, '--force', '--quiet']
  [status] = dry_run(env, TPU, 'status', *LOCATION)
  assert status == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'segvit-pod',
                    *GCLOUD_LOCATION]


@pytest.mark.parametrize('command,args,missing', [
    ('create', ['--zone=z', '--name=n', '--accelerator_type=v4-8'], '--project'),
    ('create', ['--project=p', '--name=n', '--accelerator_type=v4-8'], '--zone'),
    ('create', ['--project=p', '--zone=z', '--accelerator_type=v4-8'], '--name'),
    ('create', LOCATION, '--accelerator_type'),
    ('setup', ['--project=p', '--zone=z'], '--name'),
    ('run', [*LOCATION, '--workdir=gs://b/w'], '--config'),
    ('run', [*LOCATION, '--config=configs/synthetic.py'], '--workdir'),
    ('logs', ['--zone=z', '--name=n'], '--project'),
    ('delete', ['--project=p', '--name=n'], '--zone'),
])
def test_tpu_missing_required_flag(env, command, args, missing):
  result = env.run(TPU, command, *args, '--dry-run')
  assert result.returncode == 2
  assert f'missing required flag {missing}' in result.stderr
  assert result.stdout == ''


@pytest.mark.parametrize('args,message', [
    (['launch', *LOCATION], "unknown command 'launch'"),
    (['create', *LOCATION, '--accelerator_type=v4-8', '--acelerator=x'],
     'unknown flag --acelerator'),
    (['setup', *LOCATION, '--config.batch_size=8'], 'only apply to'),
    (['setup', *LOCATION, '--pretrained=no/such/file.npz'], '--pretrained=no/such/file.npz'),
    (['run', *LOCATION, *RUN_ARGS, '--pretrained=gs://b/x.npz'], "only applies to 'setup'"),
    (['run', *LOCATION, '--config=configs/nope.py', '--workdir=gs://b/w'], 'configs/nope.py'),
    (['run', *LOCATION, f'--config={ROOT}/configs/synthetic.py', '--workdir=gs://b/w'],
     'relative to the repository'),
    (['logs', *LOCATION, '--worker=all'], '--worker'),
    (['create', *LOCATION, '--name'], '--name needs a value'),
])
def test_tpu_bad_command_lines(env, args, message):
  result = env.run(TPU, *args, '--dry-run')
  assert result.returncode == 2
  assert message in result.stderr


def test_tpu_real_run_executes_exactly_the_printed_commands(env):
  """Without --dry-run (stubbed gcloud/tar), each step runs the commands --dry-run prints."""
  pretrained = env.tmp / 'vit.npz'
  pretrained.write_bytes(b'weights')
  steps = [
      ['create', *LOCATION, '--accelerator_type=v4-32', '--poll_seconds=1'],
      ['setup', *LOCATION, f'--pretrained={pretrained}'],
      ['run', *LOCATION, *RUN_ARGS, "--config.name=a 'b'"],
      ['logs', *LOCATION],
      ['stop', *LOCATION],
      ['delete', *LOCATION],
  ]
  expected = []
  for step in steps:
    expected += dry_run(env, TPU, *step)
  # create polls until ACTIVE: the describe command runs once per state.
  result = env.run(TPU, *steps[0], real_path=True,
                   extra_env={'STUB_STATES': 'WAITING_FOR_RESOURCES,ACTIVE'})
  assert result.returncode == 0, result.stderr
  assert 'WAITING_FOR_RESOURCES' in result.stderr and 'ACTIVE' in result.stderr
  for step in steps[1:]:
    result = env.run(TPU, *step, real_path=True)
    assert result.returncode == 0, result.stderr
  describe = expected[1]
  assert env.calls() == [expected[0], describe, describe] + expected[2:]


def test_tpu_create_fails_when_request_fails(env):
  result = env.run(TPU, 'create', *LOCATION, '--accelerator_type=v4-32', real_path=True,
                   extra_env={'STUB_STATES': 'FAILED'})
  assert result.returncode == 1
  assert 'segvit-pod is FAILED' in result.stderr


# ----------------------------------------------------------------------------------- SLURM

SLURM_ARGS = ['--nodes=4', '--gpus_per_node=8', '--config=configs/synthetic.py',
              '--workdir=/shared/runs/x']


def test_slurm_wrapper_submits_sbatch_script(env):
  mkdir, sbatch = dry_run(env, SLURM, *SLURM_ARGS, '--partition=gpu', '--time=1-00:00:00',
                          '--data_dir=/shared/tfds', '--config.batch_size=64',
                          '--config.mesh', 'data:-1')
  assert mkdir == ['mkdir', '-p', os.path.join(ROOT, 'logs')]
  assert sbatch == [
      'sbatch', '--job-name=segvit_jax', '--nodes=4', '--ntasks-per-node=1', '--gpus-per-node=8',
      f'--chdir={ROOT}', f'--output={ROOT}/logs/%x-%j.out', '--partition=gpu',
      '--time=1-00:00:00', SBATCH_SCRIPT, '--config=configs/synthetic.py',
      '--workdir=/shared/runs/x', '--data_dir=/shared/tfds', '--config.batch_size=64',
      '--config.mesh=data:-1']


@pytest.mark.parametrize('drop,missing', [
    ('--nodes=4', '--nodes'), ('--gpus_per_node=8', '--gpus_per_node'),
    ('--config=configs/synthetic.py', '--config'), ('--workdir=/shared/runs/x', '--workdir'),
])
def test_slurm_wrapper_missing_required_flag(env, drop, missing):
  result = env.run(SLURM, *[a for a in SLURM_ARGS if a != drop], '--dry-run')
  assert result.returncode == 2
  assert f'missing required flag {missing}' in result.stderr
  assert result.stdout == ''


def test_slurm_wrapper_rejects_bad_node_count(env):
  result = env.run(SLURM, *SLURM_ARGS, '--nodes=two', '--dry-run')
  assert result.returncode == 2 and '--nodes must be a positive integer' in result.stderr


def test_sbatch_script_runs_one_process_per_node(env):
  [srun] = dry_run(env, SBATCH_SCRIPT, '--config=configs/synthetic.py', '--workdir=/shared/w',
                   '--data_dir=/shared/tfds', '--config.batch_size=64', extra_env=SLURM_ENV)
  # The coordinator comes from scontrol (a query, so it runs even in --dry-run).
  assert env.calls(include_queries=True) == [['scontrol', 'show', 'hostnames', 'gpu[07-08]']]
  task = srun.index('--kill-on-bad-exit=1') + 1
  assert srun[:task] == ['srun', '--nodes=2', '--ntasks=2', '--ntasks-per-node=1',
                         '--kill-on-bad-exit=1']
  assert srun[task:task + 4] == ['bash', '-c', 'exec "$@" --process_id="${SLURM_NODEID}"', 'bash']
  main = srun[task + 4:]
  assert main == ['.venv/bin/python', '-m', 'segvit_jax.main', '--config=configs/synthetic.py',
                  '--workdir=/shared/w', '--coordinator_address=gpu07:24242',
                  '--num_processes=2', '--config.dataset.data_dir=/shared/tfds',
                  '--config.batch_size=64']

  # What each srun task runs: node 1 gets --process_id=1 (fake_python records its arguments).
  fake_python = os.path.join(env.stubs, 'fake_python')
  task_cmd = srun[task:task + 4] + [fake_python] + main[1:]
  subprocess.run(task_cmd, env={'SLURM_NODEID': '1', 'STUB_LOG': str(env.tmp / 'calls.jsonl')},
                 check=True, timeout=30)
  assert env.calls()[-1] == ['fake_python', *main[1:], '--process_id=1']


def test_sbatch_script_port_and_python_flags(env):
  [srun] = dry_run(env, SBATCH_SCRIPT, '--config=configs/synthetic.py', '--workdir=/w',
                   '--port=31337', '--python=/opt/venv/bin/python',
                   extra_env={**SLURM_ENV, 'STUB_HOSTS': 'node-a node-b node-c'})
  assert '--coordinator_address=node-a:31337' in srun
  assert '/opt/venv/bin/python' in srun


def test_sbatch_script_outside_slurm_job_says_so(env):
  result = env.run(SBATCH_SCRIPT, '--config=configs/synthetic.py', '--workdir=/w', '--dry-run')
  assert result.returncode == 2
  assert 'SLURM_JOB_NODELIST is not set' in result.stderr


@pytest.mark.parametrize('args,missing', [
    (['--workdir=/w'], '--config'), (['--config=configs/synthetic.py'], '--workdir')])
def test_sbatch_script_missing_required_flag(env, args, missing):
  result = env.run(SBATCH_SCRIPT, *args, '--dry-run', extra_env=SLURM_ENV)
  assert result.returncode == 2
  assert f'missing required flag {missing}' in result.stderr


def test_slurm_real_run_executes_exactly_the_printed_commands(env):
  log_dir = str(env.tmp / 'slurm_logs')
  args = [*SLURM_ARGS, f'--log_dir={log_dir}', "--config.name=a 'b'"]
  expected = dry_run(env, SLURM, *args)
  result = env.run(SLURM, *args, real_path=True)
  assert result.returncode == 0, result.stderr
  assert env.calls() == expected

  sbatch_args = expected[1][expected[1].index(SBATCH_SCRIPT) + 1:]
  expected_srun = dry_run(env, SBATCH_SCRIPT, *sbatch_args, extra_env=SLURM_ENV)
  result = env.run(SBATCH_SCRIPT, *sbatch_args, real_path=True, extra_env=SLURM_ENV)
  assert result.returncode == 0, result.stderr
  assert env.calls()[-1:] == expected_srun
