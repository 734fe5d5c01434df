from .executor import current_task as current_task
from .executor import QueueFull as QueueFull
from .executor import TaskInfo as TaskInfo
from .extension import Task as Task
from .extension import ThreadContext as ThreadContext
from .future import TaskFuture as TaskFuture
from .threads import ContextThread as ContextThread
from .threads import copy_current_context as copy_current_context

__all__ = [
    "ContextThread",
    "QueueFull",
    "Task",
    "TaskFuture",
    "TaskInfo",
    "ThreadContext",
    "copy_current_context",
    "current_task",
]
