"""Fallback chains: try strategies for one item in order until one succeeds.

A `Fallback` is itself a task: pass it to `run` (or call it), and each item
goes to the first strategy, then to the next one if that raised, and so
on. The value of the first strategy that succeeds is the item's value, and
the outcome's ``strategy`` names it. When every strategy fails, the item
fails with `FallbackError`, which keeps every strategy's error in order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from batchtools._exceptions import ConfigurationError, FallbackError


@dataclass(frozen=True, slots=True)
class FallbackValue:
    """The value of a fallback chain and the strategy that produced it.

    The engine unwraps it: the outcome's ``value`` is ``value`` and its
    ``strategy`` is ``strategy``.

    Attributes:
        value: The strategy's return value.
        strategy: The strategy's name.
    """

    value: Any
    strategy: str


def _name_of(strategy: Callable[..., Any]) -> str:
    return getattr(strategy, "__qualname__", None) or repr(strategy)


class Fallback:
    """An ordered chain of strategies for one item.

    Args:
        strategies: Callables taking an item; all sync or all coroutine
            functions.
        on: Exception types that move on to the next strategy; any other
            error fails the item at once.

    Raises:
        ConfigurationError: No strategies, or sync and async mixed.
    """

    def __init__(
        self,
        *strategies: Callable[..., Any],
        on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    ) -> None:
        if not strategies:
            raise ConfigurationError("Fallback needs at least one strategy")
        kinds = {inspect.iscoroutinefunction(s) for s in strategies}
        if len(kinds) > 1:
            described = ", ".join(f"{_name_of(s)} ({_kind_of(s)})" for s in strategies)
            raise ConfigurationError(
                "Fallback strategies must be all sync or all coroutine functions, "
                f"not a mix: {described}"
            )
        self.strategies = strategies
        self.on = on
        self.names = [_name_of(s) for s in strategies]
        self.is_async = kinds == {True}
        self._wants_context = [_takes_context(s) for s in strategies]
        # The chain offers a context parameter exactly when a strategy takes
        # one, so that the engine builds a context only then.
        parameters = [inspect.Parameter("item", inspect.Parameter.POSITIONAL_ONLY)]
        if any(self._wants_context):
            parameters.append(
                inspect.Parameter(
                    "context", inspect.Parameter.KEYWORD_ONLY, default=None
                )
            )
        self.__signature__ = inspect.Signature(parameters)
        self.__qualname__ = "Fallback(" + ", ".join(self.names) + ")"
        self.__module__ = getattr(strategies[0], "__module__", "?")

    def __repr__(self) -> str:
        return f"<{self.__qualname__}>"

    def __call__(self, item: Any, context: Any = None) -> Any:
        """Run the chain on ``item``; a coroutine when the strategies are async.

        Args:
            item: The item.
            context: The task's context, passed on to each strategy that
                declares a ``context`` parameter.

        Raises:
            FallbackError: Every strategy failed.
        """
        if self.is_async:
            return self._run_async(item, context)
        errors: list[BaseException] = []
        for strategy, name, wants in self._chain():
            try:
                value = strategy(item, context=context) if wants else strategy(item)
                return FallbackValue(value, name)
            except self.on as error:
                errors.append(error)
        raise FallbackError(self.names, errors)

    async def _run_async(self, item: Any, context: Any) -> FallbackValue:
        errors: list[BaseException] = []
        for strategy, name, wants in self._chain():
            try:
                if wants:
                    value = await strategy(item, context=context)
                else:
                    value = await strategy(item)
                return FallbackValue(value, name)
            except self.on as error:
                errors.append(error)
        raise FallbackError(self.names, errors)

    def _chain(self) -> Iterator[tuple[Callable[..., Any], str, bool]]:
        return zip(self.strategies, self.names, self._wants_context, strict=True)


def _kind_of(strategy: Callable[..., Any]) -> str:
    return "async" if inspect.iscoroutinefunction(strategy) else "sync"


def _takes_context(strategy: Callable[..., Any]) -> bool:
    try:
        parameter = inspect.signature(strategy).parameters.get("context")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )
