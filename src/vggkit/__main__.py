from vggkit.cli import main

raise SystemExit(main())
