package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/tunmesh/tunmesh/tools/internal/identitycli"
)

func newIdentityCmd(streams genericiooptions.IOStreams) *cobra.Command {
	id := &cobra.Command{
		Use:   "identity",
		Short: "Create and inspect the identity trust anchor and issuer",
	}
	var o identitycli.BootstrapOptions
	bootstrap := &cobra.Command{
		Use:   "bootstrap",
		Short: "Create a trust anchor + issuer (files and an issuer Secret manifest)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.Now = time.Now()
			res, err := identitycli.Bootstrap(o)
			if err != nil {
				return fmt.Errorf("identity bootstrap: %w", err)
			}
			stdout := cmd.OutOrStdout()
			fmt.Fprintf(stdout, "trust anchor %q valid until %s\nissuer %q valid until %s\n",
				res.Anchor.Subject.CommonName, res.Anchor.NotAfter.UTC().Format(time.RFC3339),
				res.Issuer.Subject.CommonName, res.Issuer.NotAfter.UTC().Format(time.RFC3339))
			for _, p := range res.Paths {
				fmt.Fprintf(stdout, "wrote %s\n", p)
			}
			return nil
		},
	}
	fs := bootstrap.Flags()
	fs.StringVar(&o.Dir, "dir", ".", "directory for ca.crt, ca.key, tls.crt, tls.key and issuer-secret.yaml")
	fs.StringVar(&o.TrustDomain, "trust-domain", "cluster.local", "trust domain")
	fs.DurationVar(&o.AnchorValidity, "anchor-validity", identitycli.DefaultAnchorValidity, "trust anchor validity")
	fs.DurationVar(&o.IssuerValidity, "issuer-validity", identitycli.DefaultIssuerValidity, "issuer validity")
	fs.StringVar(&o.SecretNamespace, "secret-namespace", identitycli.DefaultSecretNamespace, "namespace of the issuer Secret manifest")
	fs.StringVar(&o.SecretName, "secret-name", identitycli.DefaultSecretName, "name of the issuer Secret manifest")
	fs.BoolVar(&o.Force, "force", false, "overwrite existing files")
	_ = bootstrap.MarkFlagDirname("dir")

	inspect := &cobra.Command{
		Use:   "inspect FILE.pem",
		Short: "Show a certificate chain (- reads stdin)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var (
				data []byte
				err  error
			)
			if args[0] == "-" {
				data, err = io.ReadAll(streams.In)
			} else {
				data, err = os.ReadFile(args[0])
			}
			if err == nil {
				err = identitycli.Inspect(cmd.OutOrStdout(), data, time.Now())
			}
			if err != nil {
				return fmt.Errorf("identity inspect: %w", err)
			}
			return nil
		},
	}
	id.AddCommand(bootstrap, inspect)
	return id
}
