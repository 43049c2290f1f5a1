from keeper.cli.main import main

raise SystemExit(main())
