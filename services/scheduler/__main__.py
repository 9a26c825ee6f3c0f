from services.scheduler.service import build
from shared.runner import run_service

if __name__ == "__main__":
    run_service("magi-scheduler", build)
