"""One APIRouter per concern; ``service.app.create_app`` includes them all."""
