package org.elasticsearch.plugins;

import java.util.List;

import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;

/**
 * A plugins service whose plugins are classes on the classpath, not directories of jars:
 * the launcher runs the engine from Maven artifacts, so there is no modules/ or plugins/
 * folder to scan. It lives in Elasticsearch's package because {@link LoadedPlugin} is
 * package-private (the engine's own test framework does the same).
 */
public final class ClasspathPluginsService extends PluginsService {
    private final List<LoadedPlugin> classpathPlugins;

    public ClasspathPluginsService(Settings settings, Environment environment, List<Class<? extends Plugin>> pluginClasses) {
        super(settings, environment.configFile(), null, null);
        this.classpathPlugins = pluginClasses.stream().map(ClasspathPluginsService::load).toList();
    }

    private static LoadedPlugin load(Class<? extends Plugin> pluginClass) {
        return new LoadedPlugin(ClasspathPlugins.descriptor(pluginClass), ClasspathPlugins.instantiate(pluginClass));
    }

    /** The server runs as a classpath jar, not as a named module: it has no exports to qualify. */
    @Override
    protected void addServerExportsService(java.util.Map<String, List<org.elasticsearch.jdk.ModuleQualifiedExportsService>> qualifiedExports) {}

    @Override
    protected List<LoadedPlugin> plugins() {
        return classpathPlugins;
    }
}
