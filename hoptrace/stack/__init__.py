"""The bundled sample stack: five aiohttp services reproducing the scenario hoptrace debugs.

A gateway validates each request's token with auth, then forwards it to products, cart or
payment; payment re-validates the token after its work, so a short TTL makes checkout
fail with 401 although the gateway accepted the token. Further faults (payment clock
skew, a shared client leaking tokens across users, a flaky products service, trace
propagation for ground truth) are switched on in :class:`StackConfig`.
"""

from hoptrace.stack.config import (
    DEFAULT_PORTS,
    PROPAGATION_MODES,
    SERVICES,
    StackConfig,
    StackError,
)
from hoptrace.stack.runner import RunningStack, start_stack
from hoptrace.stack.workload import FlowResult, run_checkout_flow, run_users

__all__ = [
    "DEFAULT_PORTS",
    "PROPAGATION_MODES",
    "SERVICES",
    "FlowResult",
    "RunningStack",
    "StackConfig",
    "StackError",
    "run_checkout_flow",
    "run_users",
    "start_stack",
]
