"""The model zoo: the README names every official checkpoint of the paper configs, and
`segvit-convert hf://Akide/SegViTv1/FILE` resolves from huggingface_hub's cache offline."""

import hashlib
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from conftest import subprocess_env
from segvit_jax.convert import checkpoints as convert
from segvit_jax.errors import UserError

REPO_ID = 'Akide/SegViTv1'
# The paper configs and their official files (SEGVIT_REFERENCE.md section 8.1): config, file,
# bytes (None where the reference gives ~4.1 GB only), single-scale mIoU.
ZOO = (
    ('ade20k_base', 'ade_51.3.pth', '1,306,690,241', '51.3'),
    ('ade20k_large_shrunk', 'ade_shrunk_53.9.pth', None, '53.9'),
    ('ade20k_large', 'ade_54.6.pth', None, '54.6'),
    ('cocostuff10k_large_shrunk', 'COCOstuff10k_shrunk_49.1.pth', '4,125,455,099', '49.1'),
    ('cocostuff10k_large', 'COCOstuff_49.9.pth', '4,125,455,035', '49.9'),
    ('pcontext_large_shrunk', 'PC59cls_62.3.pth', '4,121,719,851', '62.3'),
    ('pcontext_large', 'PC59cls_64.1.pth', '4,122,530,107', '64.1'),
)


def _zoo_rows():
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  return text, [line for line in text.splitlines() if line.startswith('|') and '.pth' in line]


def test_readme_zoo_names_every_official_checkpoint_and_its_licence():
  text, rows = _zoo_rows()
  assert f'huggingface.co/{REPO_ID}' in text and 'adelaidet-non-commercial' in text
  for config, filename, size, miou in ZOO:
    row = [r for r in rows if f'`{filename}`' in r]
    assert len(row) == 1, filename
    assert f'configs/{config}.py' in row[0] and miou in row[0], row[0]
    assert size is None or size in row[0], row[0]
    assert f'hf://{REPO_ID}/{filename}' in row[0], row[0]
    assert os.path.exists(os.path.join(ROOT, 'configs', config + '.py'))


def fake_hf_cache(cache, filename, content):
  """A cache as huggingface_hub lays one out: blobs/<sha256>, refs/main holding the commit,
  snapshots/<commit>/<file> a relative link to the blob."""
  repo = cache / ('models--' + REPO_ID.replace('/', '--'))
  commit = hashlib.sha1(b'segvit test revision').hexdigest()
  blob = hashlib.sha256(content).hexdigest()
  (repo / 'blobs').mkdir(parents=True)
  (repo / 'blobs' / blob).write_bytes(content)
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(commit)
  snapshot = repo / 'snapshots' / commit
  snapshot.mkdir(parents=True)
  os.symlink(os.path.join('..', '..', 'blobs', blob), snapshot / filename)
  return snapshot / filename


_RESOLVE = '''
import sys
from segvit_jax.convert import checkpoints as convert
from segvit_jax.errors import UserError
for source in sys.argv[1:]:
  try:
    print('path', convert.resolve_source(source))
  except UserError as e:
    print('error', e)
'''


def test_hf_sources_resolve_from_an_offline_cache(tmp_path):
  hub = tmp_path / 'home' / 'hub'
  expected = fake_hf_cache(hub, 'ade_51.3.pth', b'weights')
  env = subprocess_env(HF_HOME=str(tmp_path / 'home'), HF_HUB_OFFLINE='1')
  env.pop('HF_HUB_CACHE', None)
  proc = subprocess.run(
      [sys.executable, '-c', _RESOLVE, f'hf://{REPO_ID}/ade_51.3.pth',
       f'hf://{REPO_ID}/ade_54.6.pth', 'hf://Akide/ade_51.3.pth', 'local.pth'],
      env=env, capture_output=True, text=True, timeout=120, check=True)
  lines = proc.stdout.splitlines()
  assert lines[0] == f'path {expected}'
  assert lines[1] == (f'error hf://{REPO_ID}/ade_54.6.pth is not in the Hugging Face cache '
                      f'({hub}) and cannot be downloaded now (HF_HUB_OFFLINE=1, or no '
                      'connection).')
  assert lines[2].startswith('error hf://Akide/ade_51.3.pth: expected hf://OWNER/REPO/FILE')
  assert lines[3] == 'path local.pth'
  with open(lines[0].split(' ', 1)[1], 'rb') as f:
    assert f.read() == b'weights'


def test_hf_source_without_huggingface_hub_names_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
  with pytest.raises(UserError, match=re.escape(
      "hf://Akide/SegViTv1/ade_51.3.pth needs huggingface_hub, which is not installed: pip "
      "install 'segvit_jax[hf]'")):
    convert.resolve_source(f'hf://{REPO_ID}/ade_51.3.pth')
