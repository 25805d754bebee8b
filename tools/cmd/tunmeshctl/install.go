package main

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/cli-runtime/pkg/genericiooptions"

	"github.com/tunmesh/tunmesh/deploy"
	"github.com/tunmesh/tunmesh/tools/internal/installcli"
)

func newInstallCmd(streams genericiooptions.IOStreams) *cobra.Command {
	var (
		o           installcli.Options
		anchorsFile string
		sets        []string
	)
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Print tunmesh's manifests for `| kubectl apply -f -`",
		Long: `install prints everything tunmesh needs on a cluster: its namespace, RBAC,
settings, the tunmesh-identity Deployment, the node DaemonSet (agent + CNI
installer) and the identity trust anchors, for ` + "`| kubectl apply -f -`" + `.

By default it generates a trust anchor and an issuer (the issuer Secret is
part of the output; the anchor's private key is not kept). With
--identity-external-issuer the issuer Secret (tunmesh/tunmesh-identity-issuer,
cert-manager layout) is yours to provide, and --identity-trust-anchors names
the PEM trust anchors it chains to.

The cluster's pod and Service CIDRs are read from the cluster (node
spec.podCIDRs or kubeadm-config, ServiceCIDR objects); --set clusterCIDRs=...
overrides them, and then install needs no cluster access at all.

Settings (--set key=value, repeatable):
` + installcli.SettingsHelp(),
		Example: `  tunmeshctl install | kubectl apply -f -
  tunmeshctl install --registry registry.example.com/tunmesh --tag v0.1.0 | kubectl apply -f -
  tunmeshctl install --identity-external-issuer --identity-trust-anchors ca.crt --set clusterCIDRs=10.244.0.0/16,10.96.0.0/12`,
		Args: cobra.NoArgs,
	}
	cf := kubeFlags(cmd)
	fs := cmd.Flags()
	fs.StringVar(&o.Registry, "registry", installcli.DefaultRegistry, "registry (and path) of the tunmesh images")
	fs.StringVar(&o.Tag, "tag", installcli.DefaultTag, "tag of the tunmesh images")
	fs.BoolVar(&o.ExternalIssuer, "identity-external-issuer", false, "the issuer Secret is managed outside tunmeshctl (cert-manager); needs --identity-trust-anchors")
	fs.StringVar(&anchorsFile, "identity-trust-anchors", "", "PEM trust anchors the external issuer chains to")
	fs.StringArrayVar(&sets, "set", nil, "a setting, key=value (repeatable; see above)")
	transport := fs.String("transport", "", "transport between nodes: tcp or wireguard (same as --set transport=...; docs/wireguard.md)")
	encryptAll := fs.Bool("encrypt-all", false, "with --transport wireguard: all cross-node pod traffic rides WireGuard (same as --set encryptAll=true)")
	wgRequired := fs.Bool("wireguard-required", false, "with --transport wireguard, strict: nodes without a WireGuard key are refused, never reached on the underlay (same as --set wireguardRequired=true)")
	_ = cmd.MarkFlagFilename("identity-trust-anchors", "crt", "pem")
	_ = cmd.RegisterFlagCompletionFunc("set", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		var keys []string
		for _, k := range installcli.SettingKeys() {
			keys = append(keys, k+"=")
		}
		return keys, cobra.ShellCompDirectiveNoSpace | cobra.ShellCompDirectiveNoFileComp
	})
	output := addOutputFlag(cmd, "yaml", installcli.Formats...)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		// The manifests name their namespace; -n cannot move them.
		if ns := *cf.Namespace; cmd.Flags().Changed("namespace") && ns != deploy.Namespace {
			return usageError{fmt.Errorf("tunmesh installs into namespace %q; -n %q is not supported", deploy.Namespace, ns)}
		}
		if cmd.Flags().Changed("transport") {
			sets = append(sets, "transport="+*transport)
		}
		if cmd.Flags().Changed("encrypt-all") {
			sets = append(sets, "encryptAll="+strconv.FormatBool(*encryptAll))
		}
		if cmd.Flags().Changed("wireguard-required") {
			sets = append(sets, "wireguardRequired="+strconv.FormatBool(*wgRequired))
		}
		set, err := installcli.ParseSettings(sets)
		if err != nil {
			return usageError{err}
		}
		if anchorsFile != "" {
			if o.TrustAnchorsPEM, err = os.ReadFile(anchorsFile); err != nil {
				return fmt.Errorf("install: --identity-trust-anchors: %w", err)
			}
		}
		stderr := cmd.ErrOrStderr()
		ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
		defer cancel()
		client, clientErr := kubeClient(cf)
		// An upgrade keeps the installed identity material and settings.
		if clientErr == nil {
			o.Existing, err = installcli.ReadExisting(ctx, client)
			switch {
			case err != nil && set["clusterCIDRs"] != "" && !cmd.Flags().Changed("kubeconfig") && !cmd.Flags().Changed("context"):
				// Rendering offline: nothing to keep can be seen.
				fmt.Fprintf(stderr, "tunmeshctl install: cluster not reachable (%v); nothing installed to keep (trust anchor, issuer, settings). On an upgrade run this with cluster access\n", err)
				o.Existing = nil
			case err != nil:
				return fmt.Errorf("install: %w", err)
			}
		}
		if o.Existing != nil && len(o.Existing.Settings) > 0 {
			var kept []string
			for k, v := range o.Existing.Settings {
				if _, overridden := set[k]; !overridden {
					kept = append(kept, k+"="+v)
				}
			}
			if len(kept) > 0 {
				sort.Strings(kept)
				fmt.Fprintf(stderr, "tunmeshctl install: keeping the installed settings %s\n", strings.Join(kept, " "))
			}
			set = installcli.MergeSettings(o.Existing.Settings, set)
		}
		o.Record = installcli.MergeSettings(nil, set) // explicit only: detection reruns next time
		if set["clusterCIDRs"] == "" {
			if clientErr != nil {
				return fmt.Errorf("install: detect cluster CIDRs (or give --set clusterCIDRs=...): %w", clientErr)
			}
			d, err := installcli.DetectCIDRs(ctx, client)
			if err != nil {
				return fmt.Errorf("install: %w", err)
			}
			for _, n := range d.Notes {
				fmt.Fprintf(stderr, "tunmeshctl install: %s\n", n)
			}
			set["clusterCIDRs"] = d.String()
		}
		if o.Existing != nil && o.Existing.Issuer != nil && !o.ExternalIssuer {
			fmt.Fprintf(stderr, "tunmeshctl install: keeping the installed trust anchors and issuer\n")
		}
		o.Settings = set
		o.Now = time.Now()
		objs, err := installcli.Render(o)
		if err != nil {
			return fmt.Errorf("install: %w", err)
		}
		return installcli.Write(cmd.OutOrStdout(), objs, *output)
	}
	return cmd
}

func newUninstallCmd(streams genericiooptions.IOStreams) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "uninstall",
		Short: "Print what to delete for `| kubectl delete --ignore-not-found -f -`",
		Long: `uninstall prints references to everything install creates, the node
DaemonSet first: on termination its CNI installers take tunmesh-cni out of
every node's conflist and remove the binary, and running pods keep talking
(in plaintext) without a restart. It needs no cluster access.`,
		Example: `  tunmeshctl uninstall | kubectl delete --ignore-not-found -f -`,
		Args:    cobra.NoArgs,
	}
	output := addOutputFlag(cmd, "yaml", installcli.Formats...)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		return installcli.WriteUninstall(cmd.OutOrStdout(), *output)
	}
	return cmd
}
