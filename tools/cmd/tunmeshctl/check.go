package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/tunmesh/tunmesh/identity/ca"
	"github.com/tunmesh/tunmesh/identity/workload"
	"github.com/tunmesh/tunmesh/tools/internal/identitycli"
	"github.com/tunmesh/tunmesh/tools/internal/installcli"
)

// defaultControlNamespace is where tunmesh's own workloads run.
const defaultControlNamespace = "tunmesh"

// kubeFlags are the kubectl connection flags (--kubeconfig, --context, -n,
// ...) of a command that talks to a cluster.
func kubeFlags(cmd *cobra.Command) *genericclioptions.ConfigFlags {
	cf := genericclioptions.NewConfigFlags(true)
	cf.AddFlags(cmd.Flags())
	_ = cmd.RegisterFlagCompletionFunc("context", func(*cobra.Command, []string, string) ([]string, cobra.ShellCompDirective) {
		raw, err := cf.ToRawKubeConfigLoader().RawConfig()
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var names []string
		for n := range raw.Contexts {
			names = append(names, n)
		}
		return names, cobra.ShellCompDirectiveNoFileComp
	})
	_ = cmd.RegisterFlagCompletionFunc("namespace", func(c *cobra.Command, _ []string, _ string) ([]string, cobra.ShellCompDirective) {
		client, err := kubeClient(cf)
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		ctx, cancel := context.WithTimeout(c.Context(), 5*time.Second)
		defer cancel()
		list, err := client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp
		}
		var names []string
		for _, n := range list.Items {
			names = append(names, n.Name)
		}
		return names, cobra.ShellCompDirectiveNoFileComp
	})
	return cf
}

func kubeClient(cf *genericclioptions.ConfigFlags) (kubernetes.Interface, error) {
	rc, err := cf.ToRESTConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	return kubernetes.NewForConfig(rc)
}

// controlNamespace is tunmesh's namespace: -n/--namespace when given,
// else "tunmesh" (not the context's namespace: tunmesh lives in its own).
func controlNamespace(cmd *cobra.Command, cf *genericclioptions.ConfigFlags) string {
	if cmd.Flags().Changed("namespace") && cf.Namespace != nil && *cf.Namespace != "" {
		return *cf.Namespace
	}
	return defaultControlNamespace
}

// addOutputFlag registers -o/--output with the formats a command prints.
func addOutputFlag(cmd *cobra.Command, def string, formats ...string) *string {
	out := cmd.Flags().StringP("output", "o", def, "output format: one of "+fmt.Sprint(formats))
	_ = cmd.RegisterFlagCompletionFunc("output", cobra.FixedCompletions(formats, cobra.ShellCompDirectiveNoFileComp))
	prev := cmd.PreRunE
	cmd.PreRunE = func(c *cobra.Command, args []string) error {
		for _, f := range formats {
			if *out == f {
				if prev != nil {
					return prev(c, args)
				}
				return nil
			}
		}
		return usageError{fmt.Errorf("--output %q: want one of %v", *out, formats)}
	}
	return out
}

// printStructured writes v as indented JSON or as YAML.
func printStructured(w io.Writer, format string, v any) error {
	switch format {
	case "json":
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	case "yaml":
		b, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	}
	return fmt.Errorf("unknown output format %q", format)
}

type checkOptions struct {
	secret        string
	agentSelector string
	minValidity   time.Duration
	output        *string
	proxy         bool // check_proxy.go
	agents        agentFlags
}

func newCheckCmd(streams genericiooptions.IOStreams) *cobra.Command {
	var o checkOptions
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Check the control plane (trust anchors, issuer, certificates) and the data plane",
		Long: `check reads tunmesh's issuer Secret and every running agent's workload
certificates (through the API server's pod proxy) and, on a cluster where
tunmesh was installed with tunmeshctl install, the data plane: a ready agent
of the node DaemonSet on every node, each node's CNI conflist chaining
tunmesh-cni (from the agents' /status reports), and one version across the
agents and tunmesh-identity. It reports each check, passed or failed, and
exits 1 when a check fails.

With --proxy, the data-plane checks run on any install (also the local
cluster's agent processes): an agent ready on every node, the agents of one
version (the control plane's), every node's conflist chaining tunmesh-cni,
and every meshed pod holding a current certificate that chains to the trust
anchors (from the agents' observability API: needs get on pods/edges in API
group tap.tunmesh.io cluster-wide; see docs/observability.md).

-n/--namespace names tunmesh's namespace (default "tunmesh").`,
		Args: cobra.NoArgs,
	}
	cf := kubeFlags(cmd)
	cmd.Flags().StringVar(&o.secret, "issuer-secret", identitycli.DefaultSecretName, "issuer Secret (tls.crt, ca.crt)")
	cmd.Flags().StringVar(&o.agentSelector, "agent-selector", "app=tunmesh-node", "label selector of the node agent pods")
	cmd.Flags().DurationVar(&o.minValidity, "min-validity", identitycli.DefaultMinValidity, "anchors and issuer must stay valid this long")
	o.output = addOutputFlag(cmd, "text", "text", "json", "yaml")
	cmd.Flags().BoolVar(&o.proxy, "proxy", false, "data-plane checks: agents ready and of one version, conflists chained, every meshed pod's certificate current and chaining to the anchors")
	o.agents.add(cmd)
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		client, err := kubeClient(cf)
		if err != nil {
			return fmt.Errorf("check: %w", err)
		}
		ns := controlNamespace(cmd, cf)
		checks, err := runChecks(cmd.Context(), client, ns, o)
		if err != nil {
			return fmt.Errorf("check: %w", err)
		}
		var dataPlane []identitycli.Check
		var note string
		if o.proxy {
			dataPlane, err = checkProxy(cmd.Context(), cf, client, ns, o)
		} else {
			dataPlane, note, err = installcli.CheckDataPlane(cmd.Context(), client, ns, installcli.ProxyStatus(client))
		}
		if err != nil {
			return fmt.Errorf("check: %w", err)
		}
		checks = append(checks, dataPlane...)
		var notes []string
		if note != "" {
			notes = append(notes, note)
		}
		ok := true
		for _, c := range checks {
			ok = ok && c.OK
		}
		if *o.output == "text" {
			identitycli.PrintChecks(cmd.OutOrStdout(), checks)
			for _, n := range notes {
				fmt.Fprintf(cmd.OutOrStdout(), "- %s\n", n)
			}
		} else if err := printStructured(cmd.OutOrStdout(), *o.output, map[string]any{"ok": ok, "checks": checks, "notes": notes}); err != nil {
			return err
		}
		if !ok {
			return exitError{1}
		}
		return nil
	}
	return cmd
}

// runChecks runs the identity checks against a cluster: the trust anchors
// and issuer from the issuer Secret, and the leaves every running agent
// serves (fetched through the API server's pod proxy).
func runChecks(ctx context.Context, client kubernetes.Interface, ns string, o checkOptions) ([]identitycli.Check, error) {
	now := time.Now()
	sec, err := client.CoreV1().Secrets(ns).Get(ctx, o.secret, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("read issuer secret %s/%s: %w", ns, o.secret, err)
	}
	anchors, err := ca.ParseAnchors(sec.Data["ca.crt"])
	if err != nil {
		return nil, fmt.Errorf("trust anchors in %s/%s ca.crt: %w", ns, o.secret, err)
	}
	issuerCerts, err := ca.ParseCertificatesPEM(sec.Data[corev1.TLSCertKey])
	if err != nil || len(issuerCerts) == 0 {
		return nil, fmt.Errorf("issuer in %s/%s tls.crt: %v", ns, o.secret, err)
	}
	checks := identitycli.CheckAnchorsAndIssuer(anchors, &ca.Issuer{Certificate: issuerCerts[0], Chain: issuerCerts[1:]}, now, o.minValidity)

	reports, err := agentReports(ctx, client, ns, o.agentSelector, anchors.PEM())
	if err != nil {
		checks = append(checks, identitycli.Check{Name: identitycli.LeavesCheckName, Hint: err.Error()})
	} else {
		checks = append(checks, identitycli.CheckAgentLeaves(reports))
	}
	return checks, nil
}

// agentReports asks every running agent, through the API server's pod
// proxy (so the caller's RBAC applies), whether its workload certificates
// chain to anchorsPEM.
func agentReports(ctx context.Context, client kubernetes.Interface, ns, selector string, anchorsPEM []byte) ([]identitycli.AgentReport, error) {
	pods, err := client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, fmt.Errorf("list agent pods: %w", err)
	}
	var reports []identitycli.AgentReport
	for _, p := range pods.Items {
		if p.Status.Phase != corev1.PodRunning {
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		body, err := client.CoreV1().RESTClient().Post().Namespace(ns).Resource("pods").
			Name(utilnet.JoinSchemeNamePort("http", p.Name, strconv.Itoa(workload.AdminPort))).
			SubResource("proxy").Suffix(workload.VerifyPath).Body(anchorsPEM).DoRaw(pctx)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("agent %s on %s: verify certificates: %w", p.Name, p.Spec.NodeName, err)
		}
		r := identitycli.AgentReport{Agent: p.Name, Node: p.Spec.NodeName}
		if err := json.Unmarshal(body, &r.VerifyReport); err != nil {
			return nil, fmt.Errorf("agent %s: decode certificate report: %w", p.Name, err)
		}
		reports = append(reports, r)
	}
	if len(reports) == 0 {
		return nil, fmt.Errorf("no running agent pods (%s) in namespace %s", selector, ns)
	}
	return reports, nil
}
