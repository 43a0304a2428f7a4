package embedjoin.searchengine;

import java.nio.file.Path;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.http.HttpServerTransport;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.painless.PainlessPlugin;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

/**
 * One real OpenSearch node for tests and local runs, from Maven Central artifacts: the server
 * jar, its transport-netty4 module, and the k-NN plugin (for {@code knn_vector}; its Lucene
 * engine needs no native library, and the plugin extends lang-painless, hence that module).
 * See {@link Launcher} for the command line.
 */
public final class OpenSearchEngine implements Launcher.Node {
    private volatile Node node;

    /** OpenSearch's Node takes classpath plugins through this protected constructor. */
    private static final class ClasspathPluginsNode extends Node {
        ClasspathPluginsNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
            super(environment, plugins, true);
        }
    }

    public static void main(String[] args) {
        Launcher.main(args, new OpenSearchEngine());
    }

    @Override
    public int start(Path home, int port) throws Exception {
        Settings settings = Settings.builder().loadFromMap(Launcher.nodeSettings(home, port)).build();
        Environment environment = InternalSettingsPreparer.prepareEnvironment(settings, Map.of(), null, () -> "search-engine");
        node = new ClasspathPluginsNode(environment, List.of(Netty4Plugin.class, PainlessPlugin.class, knnPlugin()));
        node.start();
        return node.injector().getInstance(HttpServerTransport.class).boundAddress().publishAddress().getPort();
    }

    /** The k-NN jar comes out of the plugin's zip (not a jar artifact): on the runtime classpath only. */
    @SuppressWarnings("unchecked")
    private static Class<? extends Plugin> knnPlugin() throws ClassNotFoundException {
        return (Class<? extends Plugin>) Class.forName("org.opensearch.knn.plugin.KNNPlugin");
    }

    @Override
    public void close() throws Exception {
        Node n = node;
        if (n != null) {
            n.close();
            n.awaitClose(30, TimeUnit.SECONDS);
        }
    }
}
