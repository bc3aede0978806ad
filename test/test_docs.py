"""The docs describe the code that runs: launch arguments, topic QoS, links, and nothing local.

Each table a user relies on is compared with its one home in the code (``LAUNCH_ARGUMENTS``,
``vla_ros.nodes.qos``), so a change on either side without the other fails here. The
``ros2 topic pub`` lines are checked where they are run (test_install_space.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

from vla_ros.bringup import LAUNCH_ARGUMENTS
from vla_ros.nodes import qos

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
DOCS = sorted((ROOT / 'docs').glob('*.md'))


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with ``| first_header |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'| {first_header} |'))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([cell.strip() for cell in line.strip().strip('|').split(' | ')])
    return rows


def test_readme_is_short_and_indexes_every_doc() -> None:
    text = README.read_text(encoding='utf-8')
    assert len(text.splitlines()) <= 150
    linked = set(re.findall(r'\]\((docs/[^)#]+)', text))
    assert linked == {f'docs/{d.name}' for d in DOCS}


@pytest.mark.parametrize('doc', [README, *DOCS], ids=lambda p: p.name)
def test_links_between_docs_resolve(doc: Path) -> None:
    for target in re.findall(r'\]\(([^)#:]+)(?:#[^)]*)?\)', doc.read_text(encoding='utf-8')):
        assert (doc.parent / target).exists(), f'{doc.name}: broken link {target}'


@pytest.mark.parametrize('doc', [README, *DOCS], ids=lambda p: p.name)
def test_no_paths_of_a_development_machine(doc: Path) -> None:
    text = doc.read_text(encoding='utf-8')
    for fragment in ('/work/', '/tmp/pytest', 'device tool'):
        assert fragment not in text, f'{doc.name} mentions {fragment!r}'


@pytest.mark.parametrize('result', sorted((ROOT / 'bench' / 'results').iterdir()),
                         ids=lambda p: p.name)
def test_bench_results_name_no_paths_of_a_development_machine(result: Path) -> None:
    text = result.read_text(encoding='utf-8')
    for fragment in ('/work/', '/tmp/pytest', 'device tool'):
        assert fragment not in text, f'{result.name} mentions {fragment!r}'


def test_launch_argument_table_is_launch_arguments() -> None:
    rows = _table_rows((ROOT / 'docs' / 'operating.md').read_text(encoding='utf-8'), 'argument')
    expected = []
    for arg in LAUNCH_ARGUMENTS:
        default = f'`{arg.default}`' if arg.default else '(empty)'
        choices = f' ({" / ".join(arg.choices)})' if arg.choices else ''
        expected.append([f'`{arg.name}`', default, arg.description + choices])
    assert rows == expected


def _qos_words(profile: object) -> set[str]:
    reliability = {ReliabilityPolicy.RELIABLE: 'reliable',
                   ReliabilityPolicy.BEST_EFFORT: 'best effort'}[profile.reliability]
    durability = {DurabilityPolicy.VOLATILE: 'volatile',
                  DurabilityPolicy.TRANSIENT_LOCAL: 'transient_local'}[profile.durability]
    return {reliability, durability}


@pytest.mark.parametrize('topic, profiles', [
    ('`/vla/instruction`', (qos.OPERATOR_INPUT, qos.LATCHED_INPUT)),
    ('`/vla/estop`', (qos.OPERATOR_INPUT, qos.LATCHED_INPUT)),
    ('`/vla/episode`', (qos.LATCHED,)),
    ('`/vla/safety_status`', (qos.LATCHED,)),
    ('`/camera/image_raw`', (qos.SENSOR_DATA,)),
    ('`/camera/image_raw/compressed`', (qos.SENSOR_DATA,)),
])
def test_topic_table_states_the_qos_of_nodes_qos(topic: str, profiles: tuple) -> None:
    rows = {r[0]: r for r in _table_rows(
        (ROOT / 'docs' / 'operating.md').read_text(encoding='utf-8'), 'topic / service')}
    stated = rows[topic][3]
    for profile in profiles:
        for word in _qos_words(profile) - {'volatile'}:  # volatile is the unstated default
            assert word in stated, (topic, word, stated)
    if any(p.durability == DurabilityPolicy.VOLATILE for p in profiles) and len(profiles) > 1:
        assert 'volatile' in stated, (topic, stated)
