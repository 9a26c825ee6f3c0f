from services.agent.service import NAME, build
from shared.runner import run_service

if __name__ == "__main__":
    run_service(NAME, build, own_watchdog=True)
