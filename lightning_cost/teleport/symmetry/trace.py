"""A torch.fx trace whose nodes also carry their value on example inputs.

The rescaling analysis (:mod:`lightning_cost.teleport.symmetry.graph`) needs the shape of every
intermediate tensor (which input columns of a ``Linear`` a flattened channel owns, which axis of a
tensor is its channel axis) and must follow models whose ``forward`` branches on shapes
(``if x.dim() != 4``), which a plain ``torch.fx.symbolic_trace`` refuses. :class:`ValueTracer` is
an ``fx.Tracer`` that evaluates every node on the example inputs while it records it, so that
Python control flow takes the branch the example takes; the graph it returns holds, in
``node.meta["example_value"]``, the value each node had.

Tracing runs under ``torch.no_grad()`` with every submodule in eval mode (restored afterwards), so
it neither updates BatchNorm running statistics nor draws dropout masks: the model is left exactly
as it was.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import fx, nn

__all__ = ["MISSING", "VALUE_KEY", "TraceFailure", "trace_with_values"]

VALUE_KEY = "example_value"


class _Missing:
    """Marker for a node whose value could not be computed on the example inputs."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


class TraceFailure(RuntimeError):
    """The module could not be traced on the example inputs (the message says where)."""


class _ValueProxy(fx.Proxy):
    """A proxy whose ``len()``, ``int()``, ``float()`` and ``index()`` are those of its example value."""

    if TYPE_CHECKING:
        tracer: ValueTracer  # the only tracer that creates these proxies

    def __len__(self) -> int:
        return len(self.tracer.value_of(self))

    def __int__(self) -> int:
        return int(self.tracer.value_of(self))

    def __float__(self) -> float:
        return float(self.tracer.value_of(self))

    def __index__(self) -> int:
        return operator.index(self.tracer.value_of(self))


class ValueTracer(fx.Tracer):
    """``fx.Tracer`` that computes each recorded node on the example inputs.

    Control flow (``bool``), iteration and ``len`` on a traced value use the example value, so the
    graph is the path the example takes. Leaf modules are the standard ``torch.nn`` ones.
    """

    def __init__(self, example_args: tuple[Any, ...]) -> None:
        super().__init__()
        self._examples = tuple(example_args)
        self._placeholders = 0
        self._evaluating = False
        self.data_dependent: list[str] = []  # nodes whose tensor value steered Python control flow

    # ---------------------------------------------------------------- values
    def value_of(self, proxy: fx.Proxy) -> Any:
        """The example value of ``proxy``, which Python is about to use as a constant."""
        value = proxy.node.meta.get(VALUE_KEY, MISSING)
        if value is MISSING:
            raise fx.proxy.TraceError(
                f"the value of {proxy.node.format_node()} on the example inputs is unknown, "
                "so the control flow that depends on it cannot be followed"
            )
        if isinstance(value, torch.Tensor) and proxy.node.name not in self.data_dependent:
            self.data_dependent.append(proxy.node.name)
        return value

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        proxy.node.meta[VALUE_KEY] = self._evaluate(proxy.node)
        return proxy

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def _evaluate(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            index, self._placeholders = self._placeholders, self._placeholders + 1
            if index < len(self._examples):
                return self._examples[index]
            return node.args[0] if node.args else MISSING
        if node.op == "output":
            return MISSING
        args = fx.node.map_arg(node.args, lambda n: n.meta.get(VALUE_KEY, MISSING))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta.get(VALUE_KEY, MISSING))
        if _contains_missing((args, kwargs)):  # a default-less placeholder without an example
            return MISSING
        self._evaluating = True
        try:
            return self._run(node, args, kwargs)
        except Exception as e:
            raise TraceFailure(f"{node.format_node()} fails on the example inputs: {type(e).__name__}: {e}") from e
        finally:
            self._evaluating = False

    def _run(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "get_attr":
            value: Any = self.root
            for atom in str(node.target).split("."):
                value = getattr(value, atom)
            return value
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return cast(Callable[..., Any], node.target)(*args, **kwargs)

    # ---------------------------------------------------------------- real execution inside the trace
    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:  # computing a leaf's value: run it, record nothing
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # ---------------------------------------------------------------- control flow on traced values
    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.value_of(obj))

    def iter(self, obj: fx.Proxy) -> Iterator:
        return iter([cast(Any, obj)[i] for i in range(len(self.value_of(obj)))])

    def keys(self, obj: fx.Proxy) -> Any:
        return self.value_of(obj).keys()


def _contains_missing(structure: Any) -> bool:
    found = []
    fx.node.map_aggregate(structure, lambda v: found.append(v) if v is MISSING else None)
    return bool(found)


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; every submodule's mode is restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.train(training)


def trace_with_values(module: nn.Module, example_args: tuple[Any, ...]) -> tuple[fx.Graph, list[str]]:
    """The fx graph of ``module(*example_args)`` and the nodes whose tensor values steered control flow.

    Each node's value is in ``node.meta[VALUE_KEY]``. Raises :class:`TraceFailure` (with the
    reason) when the module cannot be traced or an op fails on the example inputs.
    """
    tracer = ValueTracer(example_args)
    try:
        with _frozen(module):
            return tracer.trace(module), tracer.data_dependent
    except TraceFailure:
        raise
    except Exception as e:
        raise TraceFailure(f"{type(e).__name__}: {e}") from e
