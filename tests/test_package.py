"""The installable package: `pip install --no-deps --target DIR .` installs every file, with
dependency ranges that admit the lock of the requirements files, and from another directory, with only
DIR on the path, the package imports, its configs ship, and its commands train and predict.

The package is installed once per module (without build isolation: the venv's setuptools, no
registry needed); every command runs in an empty directory with PYTHONPATH=DIR.
"""

import ast
import configparser
import email.parser
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
from packaging.requirements import Requirement
from PIL import Image
import pytest

from conftest import ROOT
import tiny_runs

# What the build reads: pyproject.toml, the README (long description) and the two source folders
# (the requirements files too: the tests compare them with the metadata).
_BUILD_FILES = re.compile(r'pyproject\.toml|README\.md|requirements.*\.txt')
_BUILD_DIRS = ('segvit_jax', 'configs')
_IGNORE = shutil.ignore_patterns('__pycache__', '*.pyc')



class Installed:
  """The installed copy: `site` (the --target folder), `bin`, and `run` for commands."""

  def __init__(self, site, elsewhere, env):
    self.site, self.elsewhere, self.env = str(site), str(elsewhere), env
    self.bin = os.path.join(self.site, 'bin')
    [self.dist_info] = [os.path.join(self.site, d) for d in os.listdir(self.site)
                        if d.startswith('segvit_jax-') and d.endswith('.dist-info')]

  def run(self, *cmd, timeout=300):
    """`cmd` in the empty directory, with only the installed copy on PYTHONPATH."""
    return subprocess.run([str(c) for c in cmd], cwd=self.elsewhere, env=self.env,
                          capture_output=True, text=True, timeout=timeout, check=False)

  def console_scripts(self):
    """{script name: 'module:function'} from the installed entry points."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(self.dist_info, 'entry_points.txt'))
    return dict(parser['console_scripts'])


@pytest.fixture(name='installed', scope='session')
def installed_fixture(tmp_path_factory, repo_root, subprocess_env):
  tmp = tmp_path_factory.mktemp('package')
  # A copy of the build inputs: setuptools writes build/ and *.egg-info next to its sources.
  src = tmp / 'src'
  src.mkdir()
  for name in os.listdir(repo_root):
    if _BUILD_FILES.fullmatch(name):
      shutil.copy(os.path.join(repo_root, name), src / name)
  for name in _BUILD_DIRS:
    shutil.copytree(os.path.join(repo_root, name), src / name, ignore=_IGNORE)
  site = tmp / 'site'
  proc = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
       '--target', str(site), str(src)], cwd=tmp, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  elsewhere = tmp / 'elsewhere'
  elsewhere.mkdir()
  return Installed(site, elsewhere, subprocess_env(pythonpath=[str(site)]))


def _files(top, skip=()):
  out = set()
  for folder, dirs, names in os.walk(top):
    dirs[:] = [d for d in dirs if d != '__pycache__' and
               os.path.relpath(os.path.join(folder, d), top) not in skip]
    out |= {os.path.relpath(os.path.join(folder, n), top) for n in names
            if not n.endswith('.pyc')}
  return out


def _requirements(path):
  with open(path, encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip() and not line.lstrip().startswith('#')]


def test_every_file_of_the_package_and_the_configs_is_installed(installed, repo_root):
  package = os.path.join(installed.site, 'segvit_jax')
  assert _files(package, skip=('configs',)) == _files(os.path.join(repo_root, 'segvit_jax'))
  assert _files(os.path.join(package, 'configs')) == _files(os.path.join(repo_root, 'configs'))
  assert 'ade20k_large.py' in os.listdir(os.path.join(package, 'configs'))


def _requires_dist(installed):
  """{extra or None: [Requirement]} from the installed METADATA."""
  with open(os.path.join(installed.dist_info, 'METADATA'), encoding='utf-8') as f:
    requires = email.parser.Parser().parse(f).get_all('Requires-Dist')
  by_extra = {}
  for line in requires:
    requirement = Requirement(line)
    marker = str(requirement.marker or '')
    extra = re.fullmatch(r'extra == "(\w+)"', marker)
    requirement.marker = None
    by_extra.setdefault(extra.group(1) if extra else None, []).append(requirement)
  return by_extra


def test_metadata_declares_ranges_that_admit_the_lock(installed, repo_root):
  """The package declares version ranges (pip fits it into an existing environment), and every
  exact pin of requirements*.txt (what `make` installs and the tests run on) lies in them."""
  by_extra = _requires_dist(installed)
  assert set(by_extra) == {None, 'torch', 'convert', 'tpu', 'test', 'export', 'hf'}
  declared = {r.name: r for requirements in by_extra.values() for r in requirements}
  assert all(not any(s.operator == '==' for s in r.specifier) for r in declared.values())
  assert {'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-cpu',
          'tensorflow-datasets'} <= {r.name for r in by_extra[None]}
  checked = 0
  for name in ('requirements.txt', 'requirements-torch.txt', 'requirements-test.txt'):
    for line in _requirements(os.path.join(repo_root, name)):
      pin = Requirement(line)
      [spec] = pin.specifier
      assert spec.operator == '==', line
      if pin.name in declared:
        assert declared[pin.name].specifier.contains(spec.version), (line, str(declared[pin.name]))
        checked += 1
  assert checked >= 15


def test_pip_keeps_the_jax_an_environment_already_has(installed):
  """`pip install .` where every dependency is installed already (here: the test environment,
  whatever jax it has in the declared range) installs segvit_jax alone and changes nothing else.
  Resolved offline (--no-index), as a dry run."""
  src = os.path.join(os.path.dirname(installed.site), 'src')  # the fixture's copy of the sources
  report = os.path.join(installed.elsewhere, 'report.json')
  proc = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--dry-run', '--no-index', '--no-build-isolation',
       '--report', report, '--quiet', src], cwd=installed.elsewhere,
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(report, encoding='utf-8') as f:
    to_install = [item['metadata']['name'] for item in json.load(f)['install']]
  os.remove(report)
  assert to_install == ['segvit_jax'], to_install
  version = importlib.metadata.version('jax')
  assert _requires_dist(installed)[None][0].specifier.contains(version)


@pytest.mark.lock
def test_libtpu_pin_is_one_the_pinned_jax_accepts(repo_root):
  """requirements-tpu.txt pins a libtpu that `jax[tpu]` of the installed (pinned) jax allows."""
  [tpu_extra] = [Requirement(r) for r in importlib.metadata.requires('jax')
                 if r.startswith('libtpu') and 'extra == "tpu"' in r]
  [pin] = [Requirement(r) for r in _requirements(os.path.join(repo_root, 'requirements-tpu.txt'))]
  [(operator, version)] = [(s.operator, s.version) for s in pin.specifier]
  assert (pin.name, operator) == ('libtpu', '==')
  assert tpu_extra.specifier.contains(version), (str(pin), str(tpu_extra))


def test_package_imports_from_another_directory(installed):
  """Every module imports from the installed copy (the command-line modules, which define absl
  flags on import, run as programs in the other tests)."""
  script = '''
import importlib, json, pkgutil, sys
import segvit_jax
cli = set(sys.argv[1:])
names = [m.name for m in pkgutil.walk_packages(segvit_jax.__path__, 'segvit_jax.')
         if not m.name.endswith('.__main__') and m.name not in cli]
files = [importlib.import_module(n).__file__ for n in names]
from segvit_jax.configs import synthetic
print(json.dumps({'names': names, 'files': files + [segvit_jax.__file__],
                  'num_classes': synthetic.get_config().model.num_classes}))
'''
  cli = [target.split(':')[0] for target in installed.console_scripts().values()]
  proc = installed.run(sys.executable, '-c', script, *cli)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.splitlines()[-1])
  assert {'segvit_jax.training.loop', 'segvit_jax.models.vit', 'segvit_jax.data.datasets.ade20k',
          'segvit_jax.configs.ade20k_large'} <= set(result['names'])
  assert all(f.startswith(installed.site + os.sep) for f in result['files'])
  assert result['num_classes'] == 5


def test_console_scripts_name_run_functions_and_are_documented(installed, repo_root):
  scripts = installed.console_scripts()
  with open(os.path.join(repo_root, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  assert 'segvit-train' in scripts and 'segvit-predict' in scripts
  for name, target in scripts.items():
    module, function = target.split(':')
    path = os.path.join(installed.site, *module.split('.')) + '.py'
    assert os.path.isfile(path), f'{name} = {target}: no {path}'
    with open(path, encoding='utf-8') as f:
      defined = {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}
    assert function in defined, f'{name} = {target}: {module} defines no {function}()'
    assert os.access(os.path.join(installed.bin, name), os.X_OK), name
    assert name in readme, f'README.md does not mention {name}'


def test_predict_help_from_another_directory(installed, run_cli):
  proc = run_cli('segvit_jax.predict', '--help', env=installed.env, cwd=installed.elsewhere)
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert '--checkpoint' in proc.stdout and '--output' in proc.stdout


def test_installed_commands_train_and_predict(installed, run_cli):
  """The user's way after pip: the shipped configs, segvit-train, segvit-predict."""
  proc = run_cli('segvit_jax.configs', env=installed.env, cwd=installed.elsewhere)
  configs = proc.stdout.strip()
  assert configs == os.path.join(installed.site, 'segvit_jax', 'configs'), proc.stderr

  workdir = os.path.join(installed.elsewhere, 'run')
  # A 1-step run of the tiny model: enough for a checkpoint to predict with.
  overrides = [tiny_runs.flag(k, v) for k, v in {**tiny_runs.TINY, 'num_train_steps': 1,
                                                 'checkpoint_every_steps': 1}.items()]
  proc = installed.run(os.path.join(installed.bin, 'segvit-train'),
                       f'--config={configs}/synthetic.py', f'--workdir={workdir}', *overrides,
                       timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.listdir(os.path.join(workdir, 'checkpoints'))

  images = os.path.join(installed.elsewhere, 'images')
  os.mkdir(images)
  rng = np.random.default_rng(0)
  sizes = {'a.jpg': (40, 56), 'b.png': (40, 56)}  # one shape: one compilation
  for name, size in sizes.items():
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
        os.path.join(images, name))
  out = os.path.join(installed.elsewhere, 'out')
  proc = installed.run(os.path.join(installed.bin, 'segvit-predict'), f'--checkpoint={workdir}',
                       images, f'--output={out}', '--noprogress')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Segmented 2 images' in proc.stdout
  for name, size in sizes.items():
    labels = np.asarray(Image.open(os.path.join(out, 'labels', name[:-4] + '.png')))
    assert labels.shape == size and labels.max() < 3


def _paper_configs(root):
  folder = os.path.join(root, 'configs')
  return sorted(n[:-3] for n in os.listdir(folder)
                if n.endswith('.py') and not n.startswith('_') and n != 'synthetic.py')


@pytest.mark.parametrize('name', _paper_configs(ROOT))
def test_paper_config_command_starts_from_the_matching_imagenet_vit(name, repo_root):
  """Each paper config's docstring command loads the AugReg ViT of its backbone's size (without
  it the ViT trains from scratch), and says where to download that file."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(repo_root, 'configs',
                                                                   name + '.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  width = {768: 'B_16', 1024: 'L_16'}[module.get_config().model.embed_dim]
  [pretrained] = re.findall(r'--config\.pretrained_backbone=(\S+)', module.__doc__)
  assert pretrained.startswith(width + '-i21k-') and pretrained.endswith('-res_384.npz')
  assert f'https://storage.googleapis.com/vit_models/augreg/{pretrained}' in module.__doc__
  assert f'--config=configs/{name}.py' in module.__doc__
