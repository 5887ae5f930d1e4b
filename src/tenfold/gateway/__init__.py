"""ASGI integration: middleware, auth, problem responses, health, metrics.

app = FastAPI()
runtime = tenfold.gateway.install(app)     # also `tenfold.install(app)`

@app.get("/me")
async def me(user: CurrentUser) -> dict: return {"id": user.subject}
"""

from tenfold.gateway.deps import CurrentUser, RuntimeDep, current_user, rate_limit, user_of
from tenfold.gateway.install import install, runtime_of
from tenfold.gateway.problems import Problem, problem_response
from tenfold.gateway.runtime import Principal, Runtime

__all__ = [
    "CurrentUser",
    "Principal",
    "Problem",
    "Runtime",
    "RuntimeDep",
    "current_user",
    "install",
    "problem_response",
    "rate_limit",
    "runtime_of",
    "user_of",
]
