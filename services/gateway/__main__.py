from services.gateway.service import build
from shared.runner import run_service

if __name__ == "__main__":
    run_service("magi-gateway", build)
