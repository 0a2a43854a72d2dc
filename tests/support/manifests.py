"""Manifests the runtime tests serve."""

from __future__ import annotations

from packetflow.manifests import load_text
from packetflow.spec import Capability

# Builtins only: servable by any process, without tests/ importable.
BUILTIN_MANIFESTS = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: add}
spec:
  intent: Add two integers
  requires: {a: {type: integer}, b: {type: integer, default: 0}}
  provides: {sum: {type: integer}}
  implementation: {builtin: {name: transform, config: {expression: "{sum: sum([a, b])}"}}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: echo}
spec:
  intent: Echo
  requires: {message: {type: string}}
  provides: {message: {type: string}}
  implementation: {builtin: {name: echo}}
"""

TEST_MANIFESTS = BUILTIN_MANIFESTS + """---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: hold}
spec:
  intent: Wait for a gate
  requires: [gate]
  implementation: {python: {module: tests.support.handlers, function: hold}}
  timeoutSeconds: 30
  concurrency: 2
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: short-timeout}
spec:
  intent: Wait for a gate, but never long
  requires: [gate]
  implementation: {python: {module: tests.support.handlers, function: hold}}
  timeoutSeconds: 0.2
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: broken}
spec:
  intent: Break the provides contract
  provides: {answer: {type: string}}
  implementation: {python: {module: tests.support.handlers, function: breaks_contract}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: raises}
spec:
  intent: Raise
  implementation: {python: {module: tests.support.handlers, function: raises}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: progress}
spec:
  intent: Report progress
  requires: {steps: {type: integer, minimum: 1}}
  provides: {steps: {type: integer}}
  implementation: {python: {module: tests.support.handlers, function: progress}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: price}
spec:
  intent: Price an order
  requires: {item: {type: string}, quantity: {type: integer}}
  provides: {total: {type: integer}, item: {type: string}}
  implementation: {python: {module: tests.support.handlers, function: price}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: whoami}
spec:
  intent: Report the call context
  requires: {}
  effects: [network]
  implementation: {python: {module: tests.support.handlers, function: whoami}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: container}
spec:
  intent: Runs only as a container
  implementation: {image: {image: example.com/thing:1}}
"""


def sample_capabilities() -> list[Capability]:
    """The parsed test manifests (they must all be valid)."""
    loaded = load_text(TEST_MANIFESTS, "tests/support/manifests.py")
    assert not loaded.errors, loaded.errors
    return loaded.capabilities
