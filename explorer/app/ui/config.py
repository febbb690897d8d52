"""The app's settings: limits, edit options and caches that every handler reads (tests replace them here)."""
from __future__ import annotations

from ...editing import EditOptions
from ...tracing import TraceOptions
from ..caches import BoundedCache
from ..limits import AppLimits
from ..scheduler import Scheduler

TRACE_DEFAULTS = TraceOptions()  # the controls start at the engine's defaults (the paper's)
EDIT_OPTIONS = EditOptions()  # the app's edit settings (the paper's); method and layer come from the page
LIMITS = AppLimits.from_env()
MAX_LOADED_MODELS = 2  # the app's own model plus one a user loaded; older ones are dropped (sessions keep theirs)
TRACE_EXAMPLES = 8  # facts from the bundled set offered as clickable trace examples
TRACE_CACHE: BoundedCache = BoundedCache(32)  # finished traces with their figures (FinishedTrace), for repeats (a few MB)
STREAM_SECONDS = 1.0  # a streaming trace redraws its heatmaps at most this often
STOP_POLL_SECONDS = 0.2  # how soon a cancelled job hands the page back
SCHEDULER = Scheduler()  # the turns every visitor's jobs take on the shared cores
