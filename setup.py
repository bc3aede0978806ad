"""Python packaging for vla_ros (the pip path; on a ROS install, CMakeLists.txt installs it)."""

from setuptools import find_packages, setup

setup(
    name='vla_ros',
    version='0.1.0',
    description='OpenVLA on a real arm, safely: ROS 2 nodes for preprocessing, inference, safety.',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['vla_ros', 'vla_ros.*']),
    package_data={'vla_ros': ['py.typed']},
    install_requires=['numpy', 'pyyaml', 'pillow'],
    extras_require={
        'policy': ['torch', 'timm', 'transformers', 'safetensors', 'tokenizers', 'sentencepiece',
                   'peft'],
        'kinematics': ['pin'],
    },
    entry_points={
        'console_scripts': [
            'vla-ros = vla_ros.cli:main',
        ],
    },
)
