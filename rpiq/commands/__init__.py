"""One module per `rpiq` command."""
