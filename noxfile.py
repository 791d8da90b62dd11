"""Developer tasks: ``nox -s tests`` (default suite), ``nox -s lint``, ``nox -s bench``."""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The fast test suite on tiny generated data (what CI runs)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Static checks with ruff."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "ad", "tests", "benchmarks", "noxfile.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed benchmark: prints backbone floor vs fit+test wall time (see README)."""
    session.install("-e", ".")
    session.run("python", "benchmarks/bench_padim.py", *session.posargs)
