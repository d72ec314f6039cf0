from sevmigd.cli import main

raise SystemExit(main())
