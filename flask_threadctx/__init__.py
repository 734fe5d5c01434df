from .contexts.threads import ContextThread as ContextThread
from .contexts.threads import copy_current_context as copy_current_context
from .control import check_cancelled as check_cancelled
from .errors import BrokerUnavailable as BrokerUnavailable
from .errors import QueueFull as QueueFull
from .errors import RemoteTaskError as RemoteTaskError
from .errors import ResultElsewhere as ResultElsewhere
from .errors import TaskCancelled as TaskCancelled
from .errors import TaskExpired as TaskExpired
from .errors import TaskTimeout as TaskTimeout
from .extension import ThreadContext as ThreadContext
from .future import TaskFuture as TaskFuture
from .model import current_task as current_task
from .model import TaskInfo as TaskInfo
from .progress import Progress as Progress
from .progress import report_progress as report_progress
from .signals import task_cancelled as task_cancelled
from .signals import task_failed as task_failed
from .signals import task_finished as task_finished
from .signals import task_progress as task_progress
from .signals import task_rejected as task_rejected
from .signals import task_retried as task_retried
from .signals import task_started as task_started
from .signals import task_submitted as task_submitted
from .task import Task as Task

__all__ = [
    "BrokerUnavailable",
    "ContextThread",
    "Progress",
    "QueueFull",
    "RemoteTaskError",
    "ResultElsewhere",
    "Task",
    "TaskCancelled",
    "TaskExpired",
    "TaskFuture",
    "TaskInfo",
    "TaskTimeout",
    "ThreadContext",
    "check_cancelled",
    "copy_current_context",
    "current_task",
    "report_progress",
    "task_cancelled",
    "task_failed",
    "task_finished",
    "task_progress",
    "task_rejected",
    "task_retried",
    "task_started",
    "task_submitted",
]
