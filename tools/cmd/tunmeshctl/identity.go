package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/tunmesh/tunmesh/tools/internal/identitycli"
)

func runIdentity(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "bootstrap":
		fs := flag.NewFlagSet("tunmeshctl identity bootstrap", flag.ContinueOnError)
		fs.SetOutput(stderr)
		var o identitycli.BootstrapOptions
		fs.StringVar(&o.Dir, "dir", ".", "directory for ca.crt, ca.key, tls.crt, tls.key and issuer-secret.yaml")
		fs.StringVar(&o.TrustDomain, "trust-domain", "cluster.local", "trust domain")
		fs.DurationVar(&o.AnchorValidity, "anchor-validity", identitycli.DefaultAnchorValidity, "trust anchor validity")
		fs.DurationVar(&o.IssuerValidity, "issuer-validity", identitycli.DefaultIssuerValidity, "issuer validity")
		fs.StringVar(&o.SecretNamespace, "secret-namespace", identitycli.DefaultSecretNamespace, "namespace of the issuer Secret manifest")
		fs.StringVar(&o.SecretName, "secret-name", identitycli.DefaultSecretName, "name of the issuer Secret manifest")
		fs.BoolVar(&o.Force, "force", false, "overwrite existing files")
		if err := fs.Parse(args[1:]); err != nil {
			return 2
		}
		o.Now = time.Now()
		res, err := identitycli.Bootstrap(o)
		if err != nil {
			fmt.Fprintf(stderr, "tunmeshctl identity bootstrap: %v\n", err)
			return 1
		}
		fmt.Fprintf(stdout, "trust anchor %q valid until %s\nissuer %q valid until %s\n",
			res.Anchor.Subject.CommonName, res.Anchor.NotAfter.UTC().Format(time.RFC3339),
			res.Issuer.Subject.CommonName, res.Issuer.NotAfter.UTC().Format(time.RFC3339))
		for _, p := range res.Paths {
			fmt.Fprintf(stdout, "wrote %s\n", p)
		}
		return 0
	case "inspect":
		if len(args) != 2 {
			fmt.Fprintln(stderr, "usage: tunmeshctl identity inspect FILE.pem (- for stdin)")
			return 2
		}
		var (
			data []byte
			err  error
		)
		if args[1] == "-" {
			data, err = io.ReadAll(os.Stdin)
		} else {
			data, err = os.ReadFile(args[1])
		}
		if err == nil {
			err = identitycli.Inspect(stdout, data, time.Now())
		}
		if err != nil {
			fmt.Fprintf(stderr, "tunmeshctl identity inspect: %v\n", err)
			return 1
		}
		return 0
	default:
		fmt.Fprintf(stderr, "tunmeshctl identity: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}
