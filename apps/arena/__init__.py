"""arena, tenfold's reference app: `tenfold up` serves `apps.arena.app:create_app`."""
